"""Reference images: read once per run, sent before the images of every request.

`[task] reference_images` names paths, objects (s3://, gs://, ...) or http(s) URLs, each with an
optional caption ("a cracked weld"). `load` reads them before the run starts — an object or a URL
once, through a `Fetcher` (the run's bounds, retries and size cap; no API key) — and prepares
each like any image (pipeline/inputs/images.py: sniffed, EXIF-oriented, converted, downscaled by
`[images] max_side`), keeping its bytes in memory. A reference that cannot be used stops the run
before its first call (a ConfigError naming it), because every request would carry it. Their
sha256s and captions, in order, are part of the settings hash (`identities`), so changing a
reference, its caption or its bytes redoes the rows.

`ReferenceParts` gives the parts a request carries, each captioned "Reference image N: ..."
(pipeline/tasks/multi.py): small references inline, bigger ones uploaded once per run through
the Files API (pipeline/run/uploads.py: exactly the hashed bytes, reused from the output's state
while they live) and uploaded again when the service says an upload is gone (`settle`, called
after a request failed for an upload).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import Config, ConfigError
from pipeline.gemini.types import ImagePart
from pipeline.inputs import images
from pipeline.inputs.fetch import Fetcher, FetchError, settings_from
from pipeline.records import ImageItem, SourceFile
from pipeline.tasks import multi
from pipeline.tasks.base import Reference

# A reference goes with every request: inline it only while re-sending it costs less than one
# upload's two round trips (and the risk of the upload expiring mid-run); bigger ones are
# uploaded once. 256 KiB is ~340 KiB of base64 a request, under 2% of the 20 MB inline limit.
REFERENCE_INLINE_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class LoadedReference:
    """A reference image ready to send: its bytes in memory (`item.data`), its number (1-based)."""

    reference: Reference
    number: int
    item: ImageItem

    @property
    def caption(self) -> str:
        return multi.reference_caption(self.number, self.reference.caption)

    def identity(self) -> dict[str, Any]:
        """What the settings hash takes of it: its bytes and its caption (not where it is)."""
        return {"sha256": self.item.sha256, "caption": self.reference.caption}


def identities(loaded: tuple[LoadedReference, ...]) -> list[dict[str, Any]]:
    return [reference.identity() for reference in loaded]


def load(config: Config) -> tuple[LoadedReference, ...]:
    """Every `[task] reference_images` entry read and prepared; ConfigError for one that cannot
    be used (missing, not an image, a URL that does not answer)."""
    loaded = []
    for number, reference in enumerate(config.task.reference_images, start=1):
        try:
            item = _prepared(reference, config)
        except (OSError, ValueError) as exc:
            why = str(exc)
            if isinstance(exc, OSError) and exc.strerror:  # "no such file or directory"
                why = exc.strerror.lower()
            raise ConfigError(
                f"{config.source}: [task] reference_images: {reference.image}: {why}"
            ) from None
        loaded.append(LoadedReference(reference, number, item))
    return tuple(loaded)


def _prepared(reference: Reference, config: Config) -> ImageItem:
    if not reference.is_url:
        return _prepared_file(SourceFile(reference.image, *_split(reference.image)), config)
    name = posixpath.basename(urllib.parse.urlsplit(reference.image).path) or "reference"
    source = SourceFile(reference.image, "", name)
    with Fetcher(settings_from(config)) as fetcher:
        (read,) = fetcher.read_all([source])
    if isinstance(read, FetchError):
        raise ValueError(str(read))
    return _prepared_file(source, config, data=read)


def _split(path: str) -> tuple[str, str, int, int]:
    """(root, rel_path, size, mtime_ns) of a reference file (OSError when it is not there)."""
    info = os.stat(path)
    return os.path.dirname(path), os.path.basename(path), info.st_size, info.st_mtime_ns


def _prepared_file(source: SourceFile, config: Config, data: bytes | None = None) -> ImageItem:
    item = images.prepare(
        source, max_side=config.images.max_side, verify=config.images.verify, data=data
    )
    if item.error:
        raise ValueError(item.error)
    if item.data is None:  # kept in memory: sent with every request, read once
        item.data = images.read_bytes(item)
    item.send_size = len(item.data)
    return item


def inline_size(item: ImageItem) -> int:
    """Bytes an image adds to a request body when sent inline (base64)."""
    return (item.send_size + 2) // 3 * 4


class Uploaded(Protocol):
    """A file the service holds: what a request part needs of it."""

    @property
    def name(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def mime_type(self) -> str: ...


class ReferenceUploads(Protocol):
    """What `ReferenceParts` asks of the Files API side (`pipeline.run.uploads.Uploads` in a run;
    Batch Mode's uploads made for one job)."""

    async def get(self, item: ImageItem) -> Uploaded: ...

    async def settle(self, item: ImageItem) -> bool: ...

    def uses_upload(self, item: ImageItem) -> bool: ...


class ReferenceParts:
    """The run's reference images as request parts: inline, or uploaded once (module docstring).

    `mode` is `[images] mode`: "inline" and "upload" apply to references too; "auto" inlines
    those up to REFERENCE_INLINE_BYTES.
    """

    def __init__(
        self,
        loaded: tuple[LoadedReference, ...],
        mode: str,
        *,
        uploads: ReferenceUploads,
    ) -> None:
        self.loaded = loaded
        self.uploads = uploads
        self.inline = [_inlined(ref.item, mode) for ref in loaded]
        self.refreshed = 0  # uploads found gone and forgotten (uploaded again when next used)
        self._parts: list[ImagePart | None] = [
            ImagePart(ref.item.mime_type, data=ref.item.data, caption=ref.caption)
            if inline
            else None
            for ref, inline in zip(loaded, self.inline, strict=True)
        ]
        self._names: list[str | None] = [None] * len(loaded)
        self._lock = asyncio.Lock()

    @property
    def inline_bytes(self) -> int:
        """What the inline references and every caption add to each request body."""
        pairs = zip(self.loaded, self.inline, strict=True)
        sizes = [inline_size(ref.item) for ref, inline in pairs if inline]
        return sum(sizes) + sum(len(ref.caption.encode()) for ref in self.loaded)

    @property
    def uploaded(self) -> bool:
        return not all(self.inline)

    async def parts(self) -> tuple[ImagePart, ...]:
        """The parts to send now, uploading (once, whoever asks first) what is not up."""
        if any(part is None for part in self._parts):
            async with self._lock:
                for index, part in enumerate(self._parts):
                    if part is None:
                        self._parts[index] = await self._upload(index)
        return tuple(part for part in self._parts if part is not None)

    async def _upload(self, index: int) -> ImagePart:
        reference = self.loaded[index]
        upload = await self.uploads.get(reference.item)
        self._names[index] = upload.name
        return ImagePart(upload.mime_type, file_uri=upload.uri, caption=reference.caption)

    async def settle(self) -> bool:
        """A request failed for an upload (gone, or not usable): each reference upload is
        looked at (`Uploads.settle`), those the service no longer has (or FAILED) are
        forgotten, so the next `parts` uploads them again. Whether one was the cause."""
        causes = []
        async with self._lock:
            for index, name in enumerate(self._names):
                if name is None:
                    continue
                item = self.loaded[index].item
                causes.append(await self.uploads.settle(item))
                if not self.uploads.uses_upload(item):  # forgotten: uploaded again when next used
                    self._parts[index] = self._names[index] = None
                    self.refreshed += 1
        return any(causes)


def _inlined(item: ImageItem, mode: str) -> bool:
    if mode == "auto":
        return item.send_size <= REFERENCE_INLINE_BYTES
    return mode == "inline"
