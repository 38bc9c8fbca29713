"""Files that are whole or absent: write under a hidden temporary name, fsync, then rename (may
replace) or link (never replaces), fsync the folder. One helper, so every file the pipeline
commits (parts, run summaries, exports) survives a kill -9 or a power cut the same way.
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
# link() refused by the filesystem itself (FAT, some network and FUSE mounts): fall back to a
# rename after an existence check, which is whole-or-absent but not exclusive against a racer.
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


class AlreadyExists(FileExistsError):
    """`create_new` found the name taken: nothing was written over it."""


def temp_name(final: Path, scratch: Path | None = None) -> Path:
    """The hidden temporary for `final`: beside it, or in `scratch` (a folder on the same
    filesystem) when `final`'s own folder must hold nothing but finished files — an output's
    `data/`, which Polars reads whole, failing on any file that is not Parquet."""
    folder = final.parent if scratch is None else scratch
    return folder / f".{final.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def atomic_write(
    final: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    scratch: Path | None = None,
) -> None:
    """Call `write(file)` on a temporary (see temp_name), then make it `final` durably."""
    _commit(Path(final), write, _replace, scratch)


def create_new(
    final: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    scratch: Path | None = None,
) -> None:
    """Like atomic_write, but never over an existing `final` (AlreadyExists): the temporary is
    hard-linked to its name, which fails if the name is taken, the way a conditional PUT
    (`If-None-Match: *`) fails on an object store."""
    _commit(Path(final), write, _link, scratch)


def _commit(
    final: Path,
    write: Callable[[BinaryIO], object],
    publish: Callable,
    scratch: Path | None,
) -> None:
    temp = temp_name(final, scratch)
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        publish(temp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_dir(final.parent)


def _replace(temp: Path, final: Path) -> None:
    os.replace(temp, final)


def _link(temp: Path, final: Path) -> None:
    try:
        os.link(temp, final)
    except FileExistsError:
        raise AlreadyExists(errno.EEXIST, "already exists", str(final)) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(final):
            raise AlreadyExists(errno.EEXIST, "already exists", str(final)) from None
        os.replace(temp, final)


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
