"""Images of a request, from either API flavour: decoded, checked, measured, analysed.

Inline bytes come as base64 (standard or URL-safe, padded or not: the SDK sends URL-safe); a file
reference must name an ACTIVE file of this server's store, or, for a reader made with `gs_roots`
(the Vertex surface's), a `gs://bucket/name` object, read from the folder its bucket is mapped
to (`--gs-root bucket=DIR`) as Vertex reads Cloud Storage itself: the client sends no bytes. The
header is read at once (size, for billing); pixels are decoded only when an answer needs them,
and analyses are cached by sha256 because benchmarks resend the same images.
"""

from __future__ import annotations

import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.localserver import errors
from pipeline.localserver.files import FileStore, StoredFile, file_id_in_uri
from pipeline.localserver.vision import Analysis, ImageDecodeError, analyse, open_image

SUPPORTED_IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}
)  # generateContent: docs/gemini-api.md § Sending images
# Interactions: the SDK's ImageContentMimeType literal (google-genai 3.6,
# `_gaos/types/interactions/imagecontent.py`) lists three more (rule image.mime)
INTERACTIONS_IMAGE_TYPES = SUPPORTED_IMAGE_TYPES | {"image/gif", "image/bmp", "image/tiff"}
ANALYSIS_CACHE_SIZE = 256  # recent images' analyses, by sha256
_URLSAFE = str.maketrans("-_", "+/")


@dataclass(slots=True)
class ImageInput:
    """One image of a request, checked and measured."""

    image: Image.Image  # header read; pixels decoded only when an answer needs them
    mime_type: str
    sha256: str
    resolution: str | None  # per-image media resolution: low | medium | high | ultra_high
    caption: str | None = None  # the text part right before it in the request, if any


class ImageReader:
    """Turns image parts into ImageInputs; keeps the recent analyses."""

    def __init__(self, files: FileStore, gs_roots: Mapping[str, str] | None = None) -> None:
        self.files = files
        self.gs_roots = {bucket: Path(root) for bucket, root in (gs_roots or {}).items()}
        self.gs_reads = 0  # gs:// objects this reader fetched itself (no client bytes)
        self._analyses: OrderedDict[str, Analysis] = OrderedDict()

    def inline(
        self,
        mime_type: str | None,
        data: str | None,
        where: str,
        types: frozenset[str] = SUPPORTED_IMAGE_TYPES,
    ) -> ImageInput:
        if not isinstance(data, str) or not data:
            raise errors.invalid_argument(
                f"'{where}.data' is required.", rule="image.required", field=f"{where}.data"
            )
        if not mime_type:
            raise errors.invalid_argument(
                f"'{where}.mime_type' is required.",
                rule="image.required",
                field=f"{where}.mime_type",
            )
        raw = b64decode(data)
        if raw is None:
            raise errors.bad_base64(f"{where}.data")
        return self._measure(raw, mime_type, hashlib.sha256(raw).hexdigest(), types)

    def stored(
        self,
        mime_type: str | None,
        uri: str | None,
        where: str,
        types: frozenset[str] = SUPPORTED_IMAGE_TYPES,
    ) -> ImageInput:
        if not uri:
            raise errors.invalid_argument(
                f"'{where}.file_uri' is required.", rule="image.required", field=f"{where}.file_uri"
            )
        if uri.startswith("gs://") and self.gs_roots:
            raw = self.gs_object(uri)
            mime = mime_type or "application/octet-stream"
            return self._measure(raw, mime, hashlib.sha256(raw).hexdigest(), types)
        stored = self.active_file(uri)
        return self._measure(stored.data, mime_type or stored.mime_type, stored.sha256, types)

    def gs_object(self, uri: str) -> bytes:
        """The bytes of a gs:// object in a mapped bucket; 400 for any other (rule
        vertex.gs-object), as for an object the service cannot read."""
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        root = self.gs_roots.get(bucket)
        path = (root / name).resolve() if root is not None and name else None
        inside = root is not None and path is not None and path.is_relative_to(root.resolve())
        if path is None or not inside or not path.is_file():
            raise errors.gs_object_unreadable(uri)
        self.gs_reads += 1
        return path.read_bytes()

    def active_file(self, uri: str) -> StoredFile:
        """The ACTIVE file a `files/<id>` name or URI points at (403 / 400 otherwise)."""
        file_id = file_id_in_uri(uri)
        stored = self.files.get(file_id) if file_id else None
        if file_id is None or stored is None:
            raise errors.file_not_found(file_id or uri.rsplit("/", 1)[-1])
        if self.files.state(stored) != "ACTIVE":
            raise errors.file_not_active(file_id)
        return stored

    def analysis(self, image: ImageInput) -> Analysis:
        cached = self._analyses.get(image.sha256)
        if cached is not None:
            self._analyses.move_to_end(image.sha256)
            return cached
        try:
            analysis = analyse(image.image)
        except ImageDecodeError:
            raise errors.undecodable_image() from None
        self._analyses[image.sha256] = analysis
        if len(self._analyses) > ANALYSIS_CACHE_SIZE:
            self._analyses.popitem(last=False)
        return analysis

    def _measure(
        self, raw: bytes, mime_type: str, sha256: str, types: frozenset[str]
    ) -> ImageInput:
        mime = mime_type.lower()
        if mime not in types:
            raise errors.unsupported_mime(mime)
        try:
            image = open_image(raw)
        except ImageDecodeError:
            raise errors.undecodable_image() from None
        return ImageInput(image=image, mime_type=mime, sha256=sha256, resolution=None)


def b64decode(data: str) -> bytes | None:
    """Standard or URL-safe base64, padded or not; None if invalid."""
    if "-" in data or "_" in data:
        data = data.translate(_URLSAFE)
    if len(data) % 4:
        data += "=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
