"""Files that are whole or absent: write under a hidden temporary name, fsync, rename, fsync
the folder. One helper, so every file the pipeline commits (parts, run summaries, exports)
survives a kill -9 or a power cut the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"


def temp_name(final: Path) -> Path:
    """The hidden temporary beside `final` (no reader globs for dot-files ending in .tmp)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def atomic_write(final: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary beside `final`, then make it `final` durably."""
    final = Path(final)
    temp = temp_name(final)
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(final, lambda file: file.write(data))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink durable. A folder that cannot be fsynced (some filesystems
    refuse) only risks losing the newest change on power loss, so that is a warning."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            log.warning("could not fsync directory %s: %s", path, exc)
    finally:
        os.close(fd)


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)
