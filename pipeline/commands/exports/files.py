"""Writing an export whole: single files atomically, folders staged and swapped in, and the
images placed beside the annotations (a symlink to each source by default, or a copy).

A folder export is built in a hidden sibling and renamed into place once complete, so a killed
export leaves the previous export (or nothing), never half of one, and no stale file of an
earlier export survives. An existing folder is replaced only when it is empty or carries the
marker an export leaves; a folder of the user's is refused, not emptied.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageOps

from pipeline.commands.exports.dataset import ExportError, ExportImage
from pipeline.inputs.fetch import Fetcher, FetchError, FetchSettings
from pipeline.locations import is_url
from pipeline.output.fsutil import atomic_write_bytes, fsync_dir
from pipeline.records import SourceFile

MARKER = ".pipeline-export.json"
FETCH_TOGETHER = 32  # remote images held in memory at once while copying
ORIENTATION = 0x0112  # the EXIF tag
JPEG_QUALITY = 95  # an upright copy is re-encoded: close to the original
# Characters XML 1.0 cannot hold even escaped (most control characters).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class NotAnExport(ExportError):
    """`--out` is a folder that holds files but is not an earlier export: not replaced."""


def write_json(path: str | os.PathLike[str], document: Any) -> None:
    """One JSON file, whole or absent; model text kept as it is (JSON escapes what it must)."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    write_text(path, text)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def xml_safe(text: str) -> str:
    """Model text as XML can hold it: ElementTree escapes markup, but a control character
    would make the file unreadable, so those are dropped."""
    return _NOT_XML.sub("", text)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike[str], format_name: str) -> Iterator[Path]:
    """A folder to build the export in; on a clean exit it becomes `out`."""
    final = Path(out)
    _check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    stage.mkdir()
    try:
        yield stage
        write_json(stage / MARKER, {"format": format_name})
        _swap_in(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_replaceable(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise NotAnExport(f"{final} is a file; --out names the folder to write")
    if final.is_dir() and any(final.iterdir()) and not (final / MARKER).exists():
        raise NotAnExport(f"{final} holds files that no export wrote; choose an empty folder")


def _swap_in(stage: Path, final: Path) -> None:
    """Two renames: the old export aside, the new one in (between them `out` is briefly
    absent, never partial), then the old one removed."""
    old = final.with_name(f".{final.name}.{secrets.token_hex(4)}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def place_images(
    images: list[ExportImage],
    folder: Path,
    *,
    copy: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> tuple[list[ExportImage], Counter[str]]:
    """Put each image in `folder` under its flat name: a symlink to the local source (no
    second copy of a big dataset; the links name absolute paths, so the export can move but
    the images cannot) or, with `copy`, a copy; an EXIF-turned file is always written upright
    (`_turned`). Objects and URLs are always downloaded, through the same bounded `Fetcher` a
    run reads them with. Returns the images placed and why the others were not."""
    folder.mkdir(parents=True, exist_ok=True)
    missing: Counter[str] = Counter()
    local = [image for image in images if not is_url(image.source)]
    placed = [image for image in local if _place_local(image, folder, copy, missing)]
    remote = [image for image in images if is_url(image.source)]
    placed_remote = _download(remote, folder, allow_hosts, missing)
    order = {id(image): n for n, image in enumerate(images)}
    return sorted([*placed, *placed_remote], key=lambda image: order[id(image)]), missing


def _place_local(image: ExportImage, folder: Path, copy: bool, missing: Counter[str]) -> bool:
    source = Path(image.source)
    if not source.is_file():
        missing["images whose source file is missing"] += 1
        return False
    target = folder / image.file
    if _turned(source):
        _write_upright(source, target)
    elif copy:
        shutil.copyfile(source, target)
    else:
        target.symlink_to(source.absolute())
    return True


def _turned(source: Path | BinaryIO) -> bool:
    """Whether the file is displayed turned (an EXIF orientation): the rows' coordinates are
    in the displayed image, and readers that ignore EXIF (most training loaders) would put
    every box in the wrong place, so such a file is written upright instead of linked."""
    try:
        with Image.open(source) as opened:
            return opened.getexif().get(ORIENTATION, 1) != 1
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # not an image Pillow reads: placed as it is, for readers that do


def _write_upright(source: Path | BinaryIO, target: Path) -> None:
    with Image.open(source) as opened:
        upright = ImageOps.exif_transpose(opened)
        upright.save(target, format=opened.format, quality=JPEG_QUALITY)


def _download(
    images: list[ExportImage], folder: Path, allow_hosts: tuple[str, ...], missing: Counter[str]
) -> list[ExportImage]:
    if not images:
        return []
    placed = []
    with Fetcher(FetchSettings(allow_hosts=allow_hosts)) as fetcher:
        for start in range(0, len(images), FETCH_TOGETHER):
            chunk = images[start : start + FETCH_TOGETHER]
            wanted = [SourceFile(path=i.source, root="", rel_path=i.source) for i in chunk]
            for image, read in zip(chunk, fetcher.read_all(wanted), strict=True):
                if isinstance(read, FetchError):
                    missing["images that could not be downloaded"] += 1
                    continue
                _write_read(read, folder / image.file)
                placed.append(image)
    return placed


def _write_read(data: bytes, target: Path) -> None:
    if _turned(io.BytesIO(data)):
        _write_upright(io.BytesIO(data), target)
    else:
        target.write_bytes(data)
