"""The Files API's state: resumable upload sessions and stored files with their lifecycle.

A file is PROCESSING for `processing_seconds` after its upload finishes, then ACTIVE, and is gone
`ttl_seconds` after creation (48 h on the real service). Times come from the injectable clock.
Files the service makes itself (Batch Mode results) are GENERATED: ACTIVE at once, downloadable.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_FILE_BYTES = 2 * 1024**3  # the documented per-file limit
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
_ID_ALPHABET = string.ascii_lowercase + string.digits
_NAME = re.compile(r"^(?:files/)?([a-z0-9][a-z0-9-]{0,39})$")  # a name a client may ask for
_IN_URI = re.compile(r"(?:^|/)files/([a-z0-9][a-z0-9-]{0,39})$")  # files/<id> ending a URI


def file_name_id(name: str) -> str | None:
    """ "files/abc" or "abc" -> "abc"; None when it is no valid file name."""
    match = _NAME.fullmatch(name)
    return match.group(1) if match else None


def file_id_in_uri(uri: str) -> str | None:
    """The id of `{base}/{version}/files/abc` or `files/abc`; None when it names no file."""
    match = _IN_URI.search(uri)
    return match.group(1) if match else None


@dataclass(slots=True)
class StoredFile:
    id: str
    display_name: str | None
    mime_type: str
    data: bytes
    created: float
    uri: str
    source: str = "UPLOADED"  # or GENERATED (made by the service; the only ones downloadable)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()


@dataclass(slots=True)
class UploadSession:
    id: str
    size: int  # declared by X-Goog-Upload-Header-Content-Length
    mime_type: str
    display_name: str | None
    file_id: str | None  # a name the client asked for ("files/<id>")
    base_uri: str  # where the file's uri will point
    received: bytearray = field(default_factory=bytearray)


def rfc3339(seconds: float) -> str:
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}Z"


class FileStore:
    def __init__(
        self, clock: Callable[[], float], processing_seconds: float, ttl_seconds: float
    ) -> None:
        self._clock = clock
        self.processing_seconds = processing_seconds
        self.ttl_seconds = ttl_seconds
        self._files: dict[str, StoredFile] = {}
        self._uploads: dict[str, UploadSession] = {}
        self.uploads_started = 0
        self.uploads_completed = 0
        self.bytes_received = 0
        self.deleted = 0
        self.expired = 0

    # uploads

    def start_upload(
        self,
        size: int,
        mime_type: str,
        display_name: str | None,
        file_id: str | None,
        base_uri: str,
    ) -> UploadSession:
        session = UploadSession(
            secrets.token_urlsafe(24), size, mime_type, display_name, file_id, base_uri
        )
        self._uploads[session.id] = session
        self.uploads_started += 1
        return session

    def upload(self, upload_id: str) -> UploadSession | None:
        return self._uploads.get(upload_id)

    def add_chunk(self, session: UploadSession, chunk: bytes) -> None:
        session.received += chunk
        self.bytes_received += len(chunk)

    def cancel_upload(self, session: UploadSession) -> None:
        self._uploads.pop(session.id, None)

    def finish_upload(self, session: UploadSession) -> StoredFile:
        self._uploads.pop(session.id, None)
        file_id = session.file_id or self._new_id()
        stored = StoredFile(
            id=file_id,
            display_name=session.display_name,
            mime_type=session.mime_type,
            data=bytes(session.received),
            created=self._clock(),
            uri=f"{session.base_uri}/files/{file_id}",
        )
        self._files[file_id] = stored
        self.uploads_completed += 1
        return stored

    def add_generated(
        self, file_id: str, data: bytes, mime_type: str, display_name: str, base_uri: str
    ) -> StoredFile:
        """A file the service made (a batch's results): ACTIVE at once, expiring as uploads do."""
        stored = StoredFile(
            file_id, display_name, mime_type, data, self._clock(), f"{base_uri}/files/{file_id}"
        )
        stored.source = "GENERATED"
        self._files[file_id] = stored
        return stored

    # files

    def get(self, file_id: str) -> StoredFile | None:
        stored = self._files.get(file_id)
        if stored is not None and self._clock() >= stored.created + self.ttl_seconds:
            del self._files[file_id]  # expired: gone (403 from now on), as on the real service
            self.expired += 1
            return None
        return stored

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        del self._files[file_id]
        self.deleted += 1
        return True

    def state(self, stored: StoredFile) -> str:
        ready = stored.created + (self.processing_seconds if stored.source == "UPLOADED" else 0)
        return "ACTIVE" if self._clock() >= ready else "PROCESSING"

    def page(self, page_size: int, page_token: str | None) -> tuple[list[StoredFile], str | None]:
        """Newest first; the token is the offset of the next page."""
        now = self._clock()
        for file_id in [f for f, s in self._files.items() if now >= s.created + self.ttl_seconds]:
            del self._files[file_id]
            self.expired += 1
        files = sorted(self._files.values(), key=lambda s: (-s.created, s.id))
        start = _decode_token(page_token)
        size = min(max(page_size, 1), MAX_PAGE_SIZE) if page_size else DEFAULT_PAGE_SIZE
        chunk = files[start : start + size]
        more = start + size < len(files)
        return chunk, (_encode_token(start + size) if more else None)

    def resource(self, stored: StoredFile) -> dict[str, Any]:
        """The File resource (camelCase; int64 as a string; sha256Hash base64, as served)."""
        created = rfc3339(stored.created)
        resource: dict[str, Any] = {"name": f"files/{stored.id}"}
        if stored.display_name:
            resource["displayName"] = stored.display_name
        resource.update(
            {
                "mimeType": stored.mime_type,
                "sizeBytes": str(len(stored.data)),
                "createTime": created,
                "updateTime": created,
                "expirationTime": rfc3339(stored.created + self.ttl_seconds),
                "sha256Hash": base64.b64encode(stored.sha256.encode("ascii")).decode("ascii"),
                "uri": stored.uri,
                "state": self.state(stored),
                "source": stored.source,
            }
        )
        if stored.source == "GENERATED":  # base_uri is {base}/{version}
            base, _, version = stored.uri.removesuffix(f"/files/{stored.id}").rpartition("/")
            resource["downloadUri"] = (
                f"{base}/download/{version}/files/{stored.id}:download?alt=media"
            )
        return resource

    @property
    def count(self) -> int:
        return len(self._files)

    def _new_id(self) -> str:
        while True:
            file_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
            if file_id not in self._files:
                return file_id


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode("ascii")


def _decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode("ascii")).decode().partition(":")
        if kind != "offset":
            raise ValueError(token)
        return max(0, int(value))
    except ValueError:
        raise ValueError("Invalid page token.") from None
