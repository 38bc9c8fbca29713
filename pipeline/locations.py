"""Where a path points: a local path, an object-store URL (s3://, gs://, az://, ...) or an
http(s) URL — told from the text alone, with no I/O. Configs, tasks, inputs and stores all ask."""

from __future__ import annotations

import os
import re

# scheme -> the fsspec implementation it needs (memory: fsspec's own, for tests of listing)
FILESYSTEMS = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "memory": "fsspec",
}

# The bounds of a store request ([storage] connect_seconds, read_seconds; used by
# pipeline/output/stores.py). Connect: a TCP and TLS handshake takes well under a second; 10 s
# leaves room for the kernel's SYN retries (after 1, 2, 4 s) on a lossy network. Read: an idle
# bound (aiohttp's `sock_read`, started once the request is sent and restarted by every byte
# that comes), never a total one, which would cut a slow big transfer; 60 s is
# google-cloud-storage's and botocore's own default request timeout.
STORE_CONNECT_SECONDS = 10.0
STORE_READ_SECONDS = 60.0

HTTP_SCHEMES = ("http", "https")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ------------------------------------------------------------------------------------ names
def scheme_of(path: str | os.PathLike[str]) -> str | None:
    """`s3` for "s3://bucket/key", None for a plain path."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_url(path: str | os.PathLike[str]) -> bool:
    return scheme_of(path) is not None


def is_object_url(path: str | os.PathLike[str]) -> bool:
    return scheme_of(path) in FILESYSTEMS


def is_http_url(path: str | os.PathLike[str]) -> bool:
    return scheme_of(path) in HTTP_SCHEMES


def local_path(path: str) -> str:
    """A `file://` URL as a plain path (other paths unchanged)."""
    return path[len("file://") :] if scheme_of(path) == "file" else path


def normalise_url(url: str) -> str:
    """`s3://bucket/prefix/` -> `s3://bucket/prefix`: one spelling per prefix."""
    scheme = scheme_of(url)
    rest = url.split("://", 1)[1].strip("/")
    rest = re.sub(r"/{2,}", "/", rest)
    return f"{scheme}://{rest}"
