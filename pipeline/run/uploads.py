"""Images sent through the Files API: upload exactly the bytes that were hashed, reuse living
uploads, forget expired ones, delete this output's uploads at the end.

An answer is filed under the sha256 of the bytes that were hashed, so the bytes uploaded must be
those bytes: a file rewritten between hashing and upload would otherwise get the new bytes'
answer under the old hash, and a later copy of the old image would inherit it without a call.
Files up to `IN_MEMORY` bytes are read once, checked against the hash and uploaded from memory;
bigger ones stream from disk and are checked after the upload against the hash the service
reports (`sha256Hash`) or, when it reports none, by hashing the file again — a mismatch deletes
the upload and fails the image with `SourceChangedError`.

Uploads live 48 hours; one is reused while it outlives the run comfortably (`MARGIN`), and
forgotten when the service says it is gone (403 / 404), so the next attempt uploads again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
from datetime import UTC, datetime, timedelta

from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.types import FileInfo
from pipeline.inputs import images
from pipeline.inputs.images import SourceChangedError
from pipeline.output.state import State, Upload
from pipeline.records import ImageItem

MARGIN = timedelta(hours=1)  # reuse an upload only if it outlives the run comfortably
LIFETIME = timedelta(hours=47)  # assumed when the service gives no expiration time
IN_MEMORY = 64 << 20  # uploaded from memory (read once, hashed, sent): exact by construction


class Uploads:
    """The output's uploads: reuse, upload, forget, delete (uses the run's State and client)."""

    def __init__(self, client: GeminiClient, state: State) -> None:
        self.client = client
        self.state = state
        self.made = 0
        self.reused = 0
        self._used: dict[str, str] = {}  # source path -> upload name, for `forget`

    async def get(self, item: ImageItem) -> Upload:
        """A living upload of exactly the item's bytes (reused, or uploaded now)."""
        sent_sha = _sent_sha(item)
        found = self.state.find_upload(sent_sha, item.mime_type, _now() + MARGIN)
        if found is not None:
            self.reused += 1
            self._used[item.source.path] = found.name
            return found
        info = await self._upload(item, sent_sha)
        if info.state != "ACTIVE":
            info = await self.client.wait_until_active(info.name)
        upload = Upload(info.name, info.uri, info.mime_type, _expiry(info))
        self.state.add_upload(sent_sha, upload)
        self.made += 1
        self._used[item.source.path] = info.name
        return upload

    async def _upload(self, item: ImageItem, sent_sha: str) -> FileInfo:
        name = _display_name(item.source.rel_path)
        if item.data is not None:  # converted or downscaled: the bytes are ours, in memory
            return await self.client.upload_file(item.data, item.mime_type, display_name=name)
        if item.send_size <= IN_MEMORY:
            data = images.read_bytes(item)  # raises SourceChangedError if the file changed
            return await self.client.upload_file(data, item.mime_type, display_name=name)
        info = await self.client.upload_file(item.source.path, item.mime_type, display_name=name)
        if not _same_bytes(info, sent_sha, item):
            await self._delete_quietly(info.name)
            raise SourceChangedError(f"{item.source.path} changed while it was uploaded")
        return info

    async def upload_unrecorded(self, item: ImageItem) -> Upload:
        """An ACTIVE upload of exactly the item's bytes, not kept for reuse nor deleted by
        `delete_all`: a Batch Mode job's image, which must live until its job's rows are
        committed (the job deletes it then)."""
        info = await self._upload(item, _sent_sha(item))
        if info.state != "ACTIVE":
            info = await self.client.wait_until_active(info.name)
        return Upload(info.name, info.uri, info.mime_type or item.mime_type, _expiry(info))

    def uses_upload(self, item: ImageItem) -> bool:
        return item.source.path in self._used

    async def settle(self, item: ImageItem) -> bool:
        """After a FAILED_PRECONDITION: make the item's upload usable if it is the cause.

        PROCESSING: wait until ACTIVE; FAILED or gone: forget it (the next attempt uploads
        again). Returns False when the file is ACTIVE: then the file is not the cause (the
        service refuses the project: billing, region), and uploading again would only loop.
        """
        name = self._used.get(item.source.path)
        if name is None:
            return True
        try:
            info = await self.client.get_file(name)
        except GeminiError:
            self.forget(item)  # gone: upload again
            return True
        if info.state == "PROCESSING":
            with contextlib.suppress(GeminiError):  # FAILED or still processing: upload again
                await self.client.wait_until_active(name)
                return True
            self.forget(item)
            return True
        if info.state != "ACTIVE":
            self.forget(item)
            return True
        return False

    def forget(self, item: ImageItem) -> None:
        """The upload used for this item is gone (expired, deleted): upload again next time."""
        name = self._used.pop(item.source.path, None)
        if name is not None:
            self.state.forget_upload(name)

    async def delete_all(self) -> None:
        """Delete this output's uploads (end of run). One the service refuses stays recorded,
        so a later run may reuse or delete it; one already gone is forgotten."""
        for name in self.state.upload_names():
            try:
                await self.client.delete_file(name)
            except GeminiError as exc:
                if exc.code not in (403, 404):
                    continue
            self.state.forget_upload(name)

    async def _delete_quietly(self, name: str) -> None:
        with contextlib.suppress(GeminiError):  # it expires in 48 h anyway; never recorded
            await self.client.delete_file(name)


def _sent_sha(item: ImageItem) -> str:
    return item.sha256 if item.data is None else hashlib.sha256(item.data).hexdigest()


def _same_bytes(info: FileInfo, sent_sha: str, item: ImageItem) -> bool:
    """Whether the service holds the bytes that were hashed (its sha256Hash, else a re-hash)."""
    reported = _hex_sha(info.sha256_hash)
    if reported is not None:
        return reported == sent_sha
    try:
        return images.file_sha256(item.source.path) == sent_sha
    except OSError:
        return False


def _hex_sha(value: str | None) -> str | None:
    """The service's sha256Hash as hex: it is base64 of the hex text, or of the raw digest."""
    if not value:
        return None
    text = value.strip().lower()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 32:
        return raw.hex()
    decoded = raw.decode("ascii", "replace").lower()
    return decoded if len(decoded) == 64 else None


def _expiry(info: FileInfo) -> datetime:
    if info.expiration_time:
        return datetime.fromisoformat(info.expiration_time.replace("Z", "+00:00"))
    return _now() + LIFETIME


def _display_name(rel_path: str) -> str:
    """Upload display names are metadata only; keep them short and printable."""
    name = "".join(ch if ch.isprintable() else "?" for ch in rel_path)
    return name[-512:]


def _now() -> datetime:
    return datetime.now(UTC)
