"""Where a dataset lives: a local folder or an object-store prefix, behind one interface.

A `Store` gives the sink, the journal, the state and the readers the same few operations with
the same guarantees wherever the output is (`open_store(path_or_url)`):

- `create(name, write)`: whole or absent, never over an existing name (`AlreadyExists`).
  Disk: temporary, fsync, `link()` (fails if the name is taken), fsync the folder. Objects: one
  PUT with `If-None-Match: *` (S3) or `ifGenerationMatch=0` (GCS).
- `replace(name, data)`: whole or absent, may replace. Disk: temporary, fsync, `rename()`,
  fsync the folder. Objects: one PUT.
- `delete(names)`: gone when it returns. Disk: unlink, fsync the folder. Objects: DELETE.
- `appender(name).append(data)`: durable when it returns. Disk: append + fsync to one file.
  Objects: one small object per append, `<name>.<n:06d>`, read back in order.
- `lock(owner)`: the single writer. Disk: `flock` on `.sink.lock` (released by the OS when the
  process dies). Objects: a `Lease` object created only if absent, renewed by compare-and-swap,
  taken over only after a whole TTL without renewal, or at once when its holder ran on this
  machine and its process is gone (`holder_gone`).
- `lock(writer, shared=True)`: one of the writers of the run holding the lock (the Ray engine's
  workers, named `<run id>.<suffix>`). Disk: a shared `flock`. Objects: `RunLease`, which
  writes nothing and holds nothing: it checks, every third of the TTL, that the lease is still
  the run's, so a writer stops when its run has lost the output.

Object stores have no rename, no append and no fsync: that is why parts are created whole under
unique names, why the journal is a series of small immutable objects, and why the lock is a
lease that expires after a crash. Which of these is atomic where is summed up in the README
("Buckets and URLs").

The cloud filesystems (s3fs, gcsfs, adlfs, all through fsspec) are the optional `cloud` extra,
imported only when such a path is used; without them a path like `s3://...` is one line saying
what to install (`MissingExtra`). Credentials and endpoints come from each store's own standard
environment (`AWS_*`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_*`).
Every gs:// and s3:// request is bounded (`Timeouts`: a connect and an idle-read timeout, the
run's `[storage]` settings); one that times out is a transient failure (`transient`), named as
a timeout (`timeout_text`).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import functools
import importlib
import io
import json
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pipeline.locations import (
    FILESYSTEMS,
    STORE_CONNECT_SECONDS,
    STORE_READ_SECONDS,
    local_path,
    normalise_url,
    scheme_of,
)
from pipeline.output.fsutil import AlreadyExists, atomic_write, create_new, fsync_dir

log = logging.getLogger(__name__)

# fsspec warns when a part's footer length is nonsense ("Not enough data was used to sample the
# parquet footer. Try setting footer_sample_size >= ..."): only a damaged part has one, and the
# reading then fails as UnreadablePart, which names the object and what to do. The warning
# would add a line of advice about fsspec's internals on the user's screen: not shown.
warnings.filterwarnings(
    "ignore", message="Not enough data was used to sample the parquet footer", module="fsspec"
)

_SILENT = logging.NullHandler()  # one instance: added to a logger twice, it is there once
CLOUD_EXTRA = "pip install 'gemini-vision-pipeline[cloud]'"
OUTPUT_SCHEMES = ("s3", "gs", "gcs")  # stores with conditional writes this module uses
LOCK_FILE = ".sink.lock"
LEASE_NAME = ".sink.lease"
LEASE_SECONDS = 60.0  # a crashed run's lease frees the output after at most this long
# A writer stops once its hold has gone unconfirmed for this share of the TTL: before another
# run could take the lease over (after a whole TTL), with a margin for the write in progress.
LAPSE = 0.9
_CHUNK = re.compile(r"^(?P<base>.+)\.(?P<n>\d{6})$")


class MissingExtra(ImportError):
    """A path needs a filesystem package that is not installed: says what to install."""


class UnreadablePart(ValueError):
    """(Here rather than in parts.py, which reads them, so that the CLI names it without loading
    pyarrow.) A `*.parquet` file in the output that this program cannot read; names it and says what
    to do. (Parts are written whole or not at all, so this is damage from outside: a disk, a
    copy, a hand.)"""

    def __init__(self, path: Path | str, why: str, remedy: str | None = None) -> None:
        remedy = remedy or (
            f"move it aside (e.g. `{_move_command(str(path))}`) and rerun: the files whose "
            "rows it held are then done again"
        )
        super().__init__(f"{path}: {why}; {remedy}")
        self.path = path


def _move_command(path: str) -> str:
    """How to set a damaged part aside where it is: a name not ending in .parquet is never a
    part. An object store has no `mv`: its own CLI copies and deletes."""
    aside = f"'{path}' '{path}.corrupt'"
    if path.startswith("s3://"):
        return f"aws s3 mv {aside}"
    if path.startswith(("gs://", "gcs://")):
        return f"gcloud storage mv {aside}"
    return f"mv {aside}"


class OutputDirBusy(RuntimeError):
    """Another sink (another run) is writing the same output."""


class LeaseLost(RuntimeError):
    """This run's lease on an object-store output was taken over or could not be renewed in
    time: it must stop writing (another run may be the writer now)."""


class VersionMismatch(OSError):
    """A compare-and-swap write or delete found another version than the one it expected."""


def check_available(url: str) -> None:
    """Raise MissingExtra (one line) unless the filesystem for `url` can be imported."""
    filesystem(scheme_of(url) or "")


class NoCredentials(OSError):
    """The store's client found no credentials in its standard environment."""


class StoreUnreachable(ConnectionError):
    """The store's endpoint did not answer (wrong AWS_ENDPOINT_URL, no network, an outage)."""


def check_listable(url: str) -> None:
    """One cheap request that fails as a listing of this input prefix would: FileNotFoundError
    (no such bucket), PermissionError (access denied), `NoCredentials`, `StoreUnreachable`
    (the endpoint does not answer), another OSError. A run asks it before it starts, as it
    checks that an input folder exists."""
    root = normalise_url(url)
    bucket, _, prefix = root.split("://", 1)[1].partition("/")
    probe_bucket(scheme_of(root) or "", bucket, prefix)


def probe_bucket(scheme: str, bucket: str, prefix: str = "") -> None:
    """One request on `bucket`, its failure named by its real cause: "no such bucket" only when
    the store said so (a missing credential and a dead endpoint looked like one through
    fsspec's `exists`, which answers False to any error)."""
    fs = filesystem(scheme)
    try:
        if scheme == "s3":
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        elif not fs.exists(bucket):
            raise FileNotFoundError(errno.ENOENT, "no such bucket", bucket)
    except OSError:
        raise
    except Exception as exc:  # botocore's own errors are not OSErrors: name them here
        raise _client_error(scheme, exc) from None


def _client_error(scheme: str, exc: Exception) -> OSError:
    """A store client's error as an OSError that says what to fix (by class name, so that
    no client package is imported for it)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return NoCredentials(
            errno.EACCES, f"no credentials for {scheme}:// ({_credential_hint(scheme)})"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
        return StoreUnreachable(
            errno.ECONNREFUSED, f"the {scheme}:// endpoint does not answer ({exc})"
        )
    return OSError(errno.EIO, f"{type(exc).__name__}: {exc}")


def _credential_hint(scheme: str) -> str:
    if scheme == "s3":
        return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if scheme in ("gs", "gcs"):
        return "set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
    return "see the store's standard environment"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a store request may wait to connect, and for its next byte once sent. gcsfs
    passes aiohttp no timeout at all (`requests_timeout=None`) and fsspec's `sync` waits for
    ever: one stalled connection held a run, and the answers it had paid for, indefinitely."""

    connect_seconds: float = STORE_CONNECT_SECONDS  # (the defaults' reasons: locations.py)
    read_seconds: float = STORE_READ_SECONDS


_timeouts = [Timeouts()]  # this process's bounds: one per process, as the filesystems are


def use_timeouts(timeouts: Timeouts) -> None:
    """Bound every store request this process makes from now on (a run's `[storage]`
    settings); the filesystems made under other bounds are forgotten."""
    if timeouts != _timeouts[0]:
        _timeouts[0] = timeouts
        filesystem.cache_clear()


def _bounds(scheme: str) -> dict[str, Any]:
    """The filesystem's arguments that bound its requests. gcsfs hands `requests_timeout` to
    every aiohttp request it makes (an `aiohttp.ClientTimeout`: no `total`); s3fs to botocore's
    Config (its own defaults, 5 s and 15 s, replaced so that one setting means one thing).
    adlfs gets none (not installed here to check its arguments): its Azure SDK bounds the
    connection (20 s), and a read by a default that is 80,000 s in some of its versions."""
    limits = _timeouts[0]
    if scheme in ("gs", "gcs"):
        import aiohttp  # here: gcsfs's own client, loaded with it (the CLI starts without it)

        timeout = aiohttp.ClientTimeout(
            sock_connect=limits.connect_seconds, sock_read=limits.read_seconds
        )
        return {"requests_timeout": timeout}
    if scheme == "s3":
        bounds = {"connect_timeout": limits.connect_seconds, "read_timeout": limits.read_seconds}
        return {"config_kwargs": bounds}
    return {}


@functools.cache
def filesystem(scheme: str) -> Any:
    """The fsspec filesystem for a scheme (one instance per process and `Timeouts`; listings
    never cached, since other runs change what is there)."""
    package = FILESYSTEMS.get(scheme)
    if package is None:
        raise ValueError(f"{scheme}:// is not a supported store ({', '.join(FILESYSTEMS)})")
    try:
        import fsspec

        importlib.import_module(package)
    except ImportError:
        raise MissingExtra(f"{scheme}:// paths need the {package} package: {CLOUD_EXTRA}") from None
    # gcsfs logs each failure it gives up on with its traceback (`logger.exception`), which an
    # application that configured no logging prints through logging's last resort; the failure
    # itself reaches the caller, which names it (a row, the run's stop): the library's records
    # go only where logging was configured
    logging.getLogger(package).addHandler(_SILENT)
    if scheme == "memory":
        return fsspec.filesystem(scheme)
    return fsspec.filesystem(scheme, use_listings_cache=False, **_bounds(scheme))


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or object: its name relative to the store, its size and a version token that
    changes whenever its bytes may have (an mtime on disk, an ETag or generation remotely)."""

    name: str
    size: int
    version: str


def is_hidden(name: str) -> bool:
    """A name with a component starting with "." (journal, lock, lease, caches, staging)."""
    return any(part.startswith(".") for part in name.split("/"))


# ------------------------------------------------------------------------------ interface
class Store:
    """The operations every output needs (see the module docstring for what each guarantees)."""

    url: str
    local: bool

    def join(self, name: str) -> str:
        """The full path or URL of `name` (for messages and for other readers)."""
        raise NotImplementedError

    def ensure(self) -> None:
        """Make the output usable (a folder is created; a bucket must exist)."""

    def list(self, prefix: str = "") -> list[Entry]:
        """Every file under the store whose name starts with `prefix`, sorted by name."""
        raise NotImplementedError

    def info(self, name: str) -> Entry | None:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def create(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        raise NotImplementedError

    def replace(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, names: Iterable[str]) -> None:
        raise NotImplementedError

    def open_parquet(
        self, names: builtins.list[str], columns: builtins.list[str] | None
    ) -> builtins.list[Any]:
        """Readable files (for pyarrow) of these Parquet objects, fetching only the footer and
        the byte ranges of `columns` where that saves a transfer."""
        raise NotImplementedError

    def appender(self, name: str) -> Appender:
        raise NotImplementedError

    def appended(self, prefix: str) -> builtins.list[str]:
        """The names of the append logs (written by `appender`) starting with `prefix`."""
        raise NotImplementedError

    def read_appended(self, name: str) -> bytes:
        raise NotImplementedError

    def delete_appended(self, name: str) -> None:
        raise NotImplementedError

    def lock(
        self, owner: str, *, wait: bool = True, ttl: float = LEASE_SECONDS, shared: bool = False
    ) -> WriterLock:
        raise NotImplementedError

    def create_bytes(self, name: str, data: bytes) -> None:
        self.create(name, lambda file: file.write(data))

    def __str__(self) -> str:
        return self.url


class Appender:
    """A log that grows by durable appends."""

    def append(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop appending (what was appended stays)."""


class WriterLock:
    """The single writer's hold on an output. `renew_every` is None when nothing needs renewing
    (a flock lives as long as the process)."""

    renew_every: float | None = None

    def renew(self) -> None:
        """Extend the hold (raises LeaseLost when it is gone)."""

    def check(self) -> None:
        """Raise LeaseLost when the hold may have lapsed: stop writing."""

    def share(self) -> None:
        """Let the run's own shared writers in beside this hold (the Ray engine's driver)."""
        raise OutputDirBusy("this output cannot be shared by several writers of one run")

    def release(self) -> None:
        raise NotImplementedError


def open_store(where: str | os.PathLike[str] | Store) -> Store:
    """The store of an output: a Store as it is, an s3:// or gs:// URL, else a local folder."""
    if isinstance(where, Store):
        return where
    text = os.fspath(where)
    scheme = scheme_of(text)
    if scheme is None or scheme == "file":
        return DiskStore(Path(local_path(text)))
    if scheme not in OUTPUT_SCHEMES:
        raise ValueError(
            f"{text}: outputs can be local folders, s3:// or gs:// prefixes "
            f"({scheme}:// works for inputs only)"
        )
    return ObjectStore(text)


def store_key(where: str | os.PathLike[str] | Store) -> str:
    """A stable identity of an output, for in-process caches."""
    store = open_store(where)
    return store.url if not store.local else str(Path(store.url).resolve())


# ----------------------------------------------------------------------------- local disk
class DiskStore(Store):
    """A local folder: today's files, flock and fsync, unchanged."""

    local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def join(self, name: str) -> str:
        return str(self.root / name)

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"output {self.root} exists and is not a folder") from None

    def list(self, prefix: str = "") -> list[Entry]:
        found = []
        top = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in files:
                path = Path(folder, name)
                rel = path.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    entry = _disk_entry(path, rel)
                    if entry is not None:
                        found.append(entry)
        return sorted(found, key=lambda e: e.name)

    def info(self, name: str) -> Entry | None:
        return _disk_entry(self.root / name, name)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def create(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        create_new(self.root / name, write, scratch=self.root)

    def replace(self, name: str, data: bytes) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / name, lambda file: file.write(data), scratch=self.root)

    def delete(self, names: Iterable[str]) -> None:
        folders = set()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)
            folders.add((self.root / name).parent)
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)

    def open_parquet(
        self, names: builtins.list[str], columns: builtins.list[str] | None
    ) -> builtins.list[Any]:
        return [str(self.root / name) for name in names]  # pyarrow reads ranges itself

    def appender(self, name: str) -> Appender:
        return _FileAppender(self.root / name)

    def appended(self, prefix: str) -> builtins.list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.name.startswith(prefix))

    def read_appended(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def delete_appended(self, name: str) -> None:
        self.delete([name])

    def lock(
        self, owner: str, *, wait: bool = True, ttl: float = LEASE_SECONDS, shared: bool = False
    ) -> WriterLock:
        return _FlockLock(self.root, shared=shared)


def _disk_entry(path: Path, name: str) -> Entry | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Entry(name, st.st_size, str(st.st_mtime_ns))


class _FileAppender(Appender):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed by close()

    def append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class _FlockLock(WriterLock):
    """The folder's advisory lock (released when the descriptor closes, or the process dies):
    exclusive for a run's single writer, shared among the writers of one run (see sink.py)."""

    def __init__(self, root: Path, *, shared: bool = False) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise NotADirectoryError(f"output {root} exists and is not a folder") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(root) from None
        self.root = root
        self._fd: int | None = fd

    def share(self) -> None:
        assert self._fd is not None, "share() after release()"  # only the holder shares its lock
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(self.root) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _busy(root: Path) -> OutputDirBusy:
    return OutputDirBusy(f"{root} is being written by another run; wait for it to finish")


# ---------------------------------------------------------------------------- object store
class ObjectStore(Store):
    """A prefix in a bucket (s3:// or gs://), through fsspec."""

    local = False

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.scheme = scheme_of(self.url) or ""
        self.fs = filesystem(self.scheme)
        self.root = self.url.split("://", 1)[1]  # bucket/prefix
        self.bucket = self.root.split("/", 1)[0]
        self._conditional = _S3Writes(self.fs) if self.scheme == "s3" else _GcsWrites(self.fs)

    def join(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def ensure(self) -> None:
        """The bucket answers: FileNotFoundError (no such bucket), `NoCredentials`,
        PermissionError, `StoreUnreachable` (see `probe_bucket`)."""
        try:
            probe_bucket(self.scheme, self.bucket)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "no such bucket (create it first)", self.bucket
            ) from None

    def list(self, prefix: str = "") -> list[Entry]:
        """One listing request per page of the prefix (the store filters by `prefix`)."""
        ask = {"prefix": prefix} if prefix and self.scheme in OUTPUT_SCHEMES else {}
        try:
            found = self.fs.find(self.root, detail=True, withdirs=False, **ask)
        except FileNotFoundError:  # no such bucket: nothing there, as for a missing folder
            return []
        start = len(self.root) + 1
        entries = []
        for path, info in found.items():
            name = path[start:]
            if path.startswith(self.root + "/") and name.startswith(prefix):
                entries.append(Entry(name, int(info.get("size") or 0), object_version(info)))
        return sorted(entries, key=lambda e: e.name)

    def info(self, name: str) -> Entry | None:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return Entry(name, int(info.get("size") or 0), object_version(info))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def create(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        try:
            self._conditional.put(self._path(name), data, if_absent=True)
        except AlreadyExists:
            # A retried PUT whose first attempt succeeded finds its own bytes: that is success.
            if self.fs.cat_file(self._path(name)) != data:
                raise

    def replace(self, name: str, data: bytes) -> None:
        self._conditional.put(self._path(name), data)

    def put_if_absent(self, name: str, data: bytes) -> str:
        return self._conditional.put(self._path(name), data, if_absent=True)

    def put_if_version(self, name: str, data: bytes, version: str) -> str:
        return self._conditional.put(self._path(name), data, if_match=version)

    def delete_if_version(self, name: str, version: str) -> None:
        self._conditional.delete(self._path(name), version)

    def copy(self, source: str, target: str) -> None:
        """A server-side copy of a whole object (all or nothing)."""
        self.fs.copy(self._path(source), self._path(target))

    def delete(self, names: Iterable[str]) -> None:
        paths = [self._path(name) for name in names]
        if paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(paths)

    def open_parquet(
        self, names: builtins.list[str], columns: builtins.list[str] | None
    ) -> builtins.list[Any]:
        """fsspec reads every footer, then exactly the column chunks wanted, concurrently."""
        from fsspec.parquet import open_parquet_files

        paths = [self._path(name) for name in names]
        return open_parquet_files(paths, fs=self.fs, columns=columns, engine="pyarrow")

    def appender(self, name: str) -> Appender:
        return _ChunkAppender(self, name)

    def appended(self, prefix: str) -> builtins.list[str]:
        bases = {m["base"] for e in self.list(prefix) if (m := _CHUNK.fullmatch(e.name))}
        return sorted(bases)

    def read_appended(self, name: str) -> bytes:
        chunks = [e.name for e in self.list(name + ".") if _CHUNK.fullmatch(e.name)]
        return b"".join(self.read(chunk) for chunk in sorted(chunks))

    def delete_appended(self, name: str) -> None:
        self.delete(e.name for e in self.list(name + ".") if _CHUNK.fullmatch(e.name))

    def lock(
        self, owner: str, *, wait: bool = True, ttl: float = LEASE_SECONDS, shared: bool = False
    ) -> WriterLock:
        if shared:
            under = RunLease(self, owner, ttl)
            under.renew()
            return under
        lease = Lease(self, owner, ttl)
        lease.acquire(wait=wait)
        return lease


def object_version(info: dict[str, Any]) -> str:
    """ETag (S3, Azure) or generation (GCS): what changes when the bytes may have."""
    for key in ("generation", "ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    return str(info.get("LastModified") or info.get("mtime") or "")


def content_id(info: dict[str, Any]) -> str:
    """What a Cloud Storage object's metadata says of its bytes, "" when nothing sure.

    `md5Hash` first: a hash of the bytes themselves, so it names the content exactly and stays
    the same when the same bytes are rewritten, copied or re-uploaded (a new generation): an
    answer bought for them is found again. A composite object (`gcloud storage cp` of a big
    file in parallel, compose) has no md5Hash, only `crc32c`: 32 bits cannot tell millions of
    objects apart by themselves, so its id adds the size and the generation, which changes on
    every rewrite. A rewrite of a composite object then costs one call again: the price of
    never giving one object's answer to other bytes whose checksums collide.
    """
    if info.get("md5Hash"):
        return f"md5:{info['md5Hash']}"
    if info.get("crc32c") and info.get("generation"):
        size = int(info.get("size") or 0)
        return f"crc32c:{info['crc32c']}:{size}:{info['generation']}"
    return ""


class _ChunkAppender(Appender):
    """Each append is one object `<name>.<n:06d>`, created whole (an object store cannot
    append): a kill leaves whole chunks, read back in order."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store = store
        self.name = name
        self.count = len(store.list(name + "."))

    def append(self, data: bytes) -> None:
        self.store.create_bytes(f"{self.name}.{self.count:06d}", data)
        self.count += 1


class _S3Writes:
    """Conditional PUT and DELETE on S3 (conditional writes: `If-None-Match: *`, `If-Match`)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_match: str = "") -> str:
        bucket, key, _ = self.fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        if if_match:
            condition = {"IfMatch": f'"{if_match}"'}
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError:
            raise AlreadyExists(errno.EEXIST, "already exists", path) from None
        except OSError as exc:
            if _precondition_failed(exc):
                raise VersionMismatch(errno.EAGAIN, "changed by another writer", path) from None
            raise
        self.fs.invalidate_cache(path)
        return str(out.get("ETag", "")).strip('"')

    def delete(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{version}"')
        except FileNotFoundError:
            return
        except OSError as exc:
            if _precondition_failed(exc):
                raise VersionMismatch(errno.EAGAIN, "changed by another writer", path) from None
            raise


class _GcsWrites:
    """Conditional uploads and deletes on GCS (`ifGenerationMatch`: 0 means "absent").

    Written from the JSON API reference and gcsfs's own `simple_upload`, whose `validate_response`
    raises a 412 as a bare FileExistsError (no code): that is the precondition failing. Tested
    against the local server's storage API, which checks `ifGenerationMatch` (the pip-installable
    gcp-storage-emulator (2026.7) ignores it: a second create over a name succeeded, tried
    2026-11-29).
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_match: str = "") -> str:
        from urllib.parse import quote

        bucket, key, _ = self.fs.split_path(path)
        condition = {"ifGenerationMatch": "0"} if if_absent else {}
        if if_match:
            condition = {"ifGenerationMatch": if_match}
        try:
            out = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="media",
                name=key,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                json_out=True,
                **condition,
            )
        except Exception as exc:
            if isinstance(exc, FileExistsError) or _precondition_failed(exc):
                error = AlreadyExists if if_absent else VersionMismatch
                raise error(errno.EEXIST, "exists or changed", path) from None
            raise
        self.fs.invalidate_cache(path)
        return str(out.get("generation", ""))

    def delete(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except FileNotFoundError:
            return
        except Exception as exc:
            if isinstance(exc, FileExistsError) or _precondition_failed(exc):
                raise VersionMismatch(errno.EAGAIN, "changed by another writer", path) from None
            raise


# ---------------------------------------------------------------------- a store's failures
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# An OSError that says what is there (or may not be), not that the store stumbled.
_DEFINITE = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)
GCSFS_BARE_ERRORS = ((OSError, "Forbidden: ", 403), (ValueError, "Bad Request: ", 400))


def transient(exc: BaseException) -> bool | None:
    """Whether a store's failure may pass if the call is made again: an I/O error or a timeout
    may (not one that names what is there: missing, taken, refused), and so may a store's own
    HTTP error that is not an OSError — gcsfs's HttpError (`code`) once its retries are spent,
    adlfs's azure HttpResponseError (`status_code`) — when its status is 408, 429 or 5xx.
    None: neither (a defect, not the store's). inputs/fetch.py and the Vertex batch staging
    (engines/batch/service.py) both judge by it."""
    if isinstance(exc, _DEFINITE):
        return False
    status = http_status(exc)
    if status is not None:
        return status in RETRY_STATUSES
    return True if isinstance(exc, TimeoutError | OSError) else None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a store's error carries (`code`, `status_code`), when it carries one;
    gcsfs answers a 403 with a bare OSError("Forbidden: <path>...") and a 400 whose message
    says "invalid" with a ValueError("Bad Request: <path>...") (`validate_response`), and a
    requester-pays bucket's 400 with a ValueError raised from its HttpError (`retry_request`)."""
    for name in ("code", "status_code"):
        status = getattr(exc, name, None)
        if isinstance(status, int) and 400 <= status <= 599:
            return status
    for kind, start, status in GCSFS_BARE_ERRORS:
        if type(exc) is kind and str(exc).startswith(start):
            return status
    if type(exc) is ValueError and exc.__cause__ is not None:  # requester-pays: from HttpError
        return http_status(exc.__cause__)
    return None


def status_text(status: int) -> str:
    """ "HTTP 404 Not Found": the standard phrase, whatever the server's own spelling."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


T = TypeVar("T")


async def retried(
    call: Callable[[], Awaitable[T]],
    attempts: int,
    pause: Callable[[int], float],
    sleep: Callable[[float], Awaitable[None]],
    on_retry: Callable[[BaseException], None] = lambda exc: None,
) -> T:
    """`call()`, made again while its failure is `transient`, `attempts` times in all, after
    `pause(attempt)` seconds each time (`on_retry` told first). A failure that is not transient,
    a defect (`transient` None) or the last one is raised as it is: the caller says what it
    means (an object's read: its row; the Vertex batch staging: the run's stop)."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if not transient(exc) or attempt + 1 >= attempts:
                raise
            on_retry(exc)
        await sleep(pause(attempt))
    raise AssertionError("unreachable")


def failure_text(exc: BaseException) -> str:
    """A store failure in one line: a timeout named as one (`timeout_text`), else its HTTP
    status when it has one, then the first line of its message (gcsfs and adlfs messages name
    the object, never a credential)."""
    timed_out = timeout_text(exc)
    if timed_out is not None:
        return timed_out
    lines = str(exc).strip().splitlines()
    first = (lines[0] if lines else type(exc).__name__)[:200]
    status = http_status(exc)
    return first if status is None else f"{status_text(status)}: {first}"


# Timeouts by class name (no client package imported for them): aiohttp's connect timeout (a
# TimeoutError too), botocore's connect and read timeouts (OSErrors through requests, not
# TimeoutErrors).
_CONNECT_TIMEOUTS = frozenset({"ConnectionTimeoutError", "ConnectTimeoutError"})
_READ_TIMEOUTS = frozenset({"ReadTimeoutError"})


def timeout_text(exc: BaseException) -> str | None:
    """A store request that timed out, in one line naming the bound it met and its setting;
    None for any other failure. (aiohttp's own words, "Timeout on reading data from socket",
    say neither.)"""
    names = {cls.__name__ for cls in type(exc).__mro__}
    limits = _timeouts[0]
    if names & _CONNECT_TIMEOUTS:
        seconds, key = limits.connect_seconds, "connect_seconds"
        return f"timed out connecting to the store ({seconds:g} s, [storage] {key})"
    if isinstance(exc, TimeoutError) or names & _READ_TIMEOUTS:
        seconds, key = limits.read_seconds, "read_seconds"
        return f"timed out: the store sent nothing for {seconds:g} s ([storage] {key})"
    return None


def _precondition_failed(exc: BaseException) -> bool:
    """A 412 from S3 (botocore's code) or GCS (gcsfs's HttpError code), however wrapped."""
    for error in (exc, exc.__cause__, exc.__context__):
        if error is None:
            continue
        code = getattr(error, "code", None)
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", code)
        if code in (412, "412", "PreconditionFailed", "ConditionalRequestConflict"):
            return True
    return False


def writer_holds(store: Store) -> bool:
    """Whether a run holds the output now, as a reader (`pipeline status`) can tell without
    waiting or writing: on disk, a shared flock is refused only while a writer holds the
    exclusive one (taken and released at once); on a bucket, the lease was renewed within its
    TTL and its holder is not known dead (a crashed run's lease says nothing then)."""
    if store.local:
        return _flock_held(store)
    lease = read_lease(store)
    if lease is None:
        return False
    facts = lease[0]
    age = time.time() - float(facts.get("renewed_at") or 0)
    return age <= float(facts.get("ttl") or LEASE_SECONDS) and not holder_gone(facts)


def _flock_held(store: Store) -> bool:
    if store.info(LOCK_FILE) is None:
        return False  # no run ever locked it (and asking must not create the file)
    try:
        store.lock("status", wait=False, shared=True).release()
    except OutputDirBusy:
        return True
    except OSError:
        return False  # a read-only output (an archive's copy): no run can be writing it
    return False


# ---------------------------------------------------------------------------------- lease
def read_lease(store: Store) -> tuple[dict[str, Any], str] | None:
    """The lease of an object-store output, as (its facts, its version); None when absent."""
    entry = store.info(LEASE_NAME)
    if entry is None:
        return None
    try:
        facts = json.loads(store.read(LEASE_NAME))
    except FileNotFoundError:
        return None
    except ValueError:
        facts = {}
    return (facts if isinstance(facts, dict) else {}), entry.version


class Lease(WriterLock):
    """The single writer of an object-store output.

    The lease is one object (`.sink.lease`: owner, host, pid, when renewed, TTL) created only if
    absent. Its holder renews it every TTL/3 by a compare-and-swap on its version, so a run that
    lost it (taken over after a pause longer than the TTL) learns so on its next renewal and
    stops. Another run finding it held watches it for one TTL, measured on its own monotonic
    clock (no trust in clocks across machines): renewed meanwhile means alive (refused at once);
    untouched for a whole TTL means the holder died, and the watcher takes it over by a
    compare-and-swap on the version it watched (two watchers: one wins). A lease whose own
    timestamp is more than two TTLs old (a crash long ago) is taken over without the watch.
    """

    def __init__(
        self,
        store: ObjectStore,
        owner: str,
        ttl: float = LEASE_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not ttl > 0:
            raise ValueError("a lease needs a positive TTL")
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.renew_every = ttl / 3
        self.version = ""
        self.confirmed = 0.0  # monotonic time of the last write the store accepted
        self._clock, self._wall, self._sleep = clock, wall, sleep

    def _body(self) -> bytes:
        facts = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": self._wall(),
            "ttl": self.ttl,
        }
        return json.dumps(facts).encode()

    def acquire(self, *, wait: bool = True) -> None:
        for _ in range(3):  # the lease may vanish between our steps: start over
            started = self._clock()
            try:
                self.version = self.store.put_if_absent(LEASE_NAME, self._body())
            except AlreadyExists:
                pass
            else:
                self.confirmed = started
                return
            if self._take_over(wait=wait):
                return
        raise OutputDirBusy(f"{self.store.url}: could not take the lease {LEASE_NAME}")

    def _take_over(self, *, wait: bool) -> bool:
        """Take the existing lease if its holder is dead; False when it vanished meanwhile."""
        held = self._read()
        if held is None:
            return False
        facts, version = held
        ttl = float(facts.get("ttl") or LEASE_SECONDS)
        long_dead = self._wall() - float(facts.get("renewed_at") or 0) > 2 * ttl
        if not long_dead and not holder_gone(facts):
            if not wait:
                raise OutputDirBusy(self._busy(facts))
            log.warning(
                "%s: run %s holds the lease; watching it for %.0f s (a live run renews it)",
                self.store.url,
                facts.get("owner"),
                ttl,
            )
            watched = self._watch(ttl, version)
            if watched == "released":
                return False  # its run ended while we watched: start over (create it)
            if watched == "renewed":
                raise OutputDirBusy(self._busy(facts))
        started = self._clock()
        try:
            self.version = self.store.put_if_version(LEASE_NAME, self._body(), version)
        except (VersionMismatch, FileNotFoundError):
            raise OutputDirBusy(self._busy(facts)) from None
        self.confirmed = started
        log.warning(
            "%s: took over the lease of run %s (its process is gone, or its lease was not "
            "renewed for %.0f s)",
            self.store.url,
            facts.get("owner"),
            ttl,
        )
        return True

    def _watch(self, ttl: float, version: str) -> str:
        """Watch the lease for one TTL: "renewed" (its holder lives), "released" (gone: its
        run ended), or "stale" (it stayed at `version` all along: its holder died)."""
        deadline = self._clock() + ttl
        while (left := deadline - self._clock()) > 0:
            self._sleep(min(left, max(ttl / 10, 0.05)))
            now = self.store.info(LEASE_NAME)
            if now is None:
                return "released"
            if now.version != version:
                return "renewed"
        return "stale"

    def _read(self) -> tuple[dict[str, Any], str] | None:
        return read_lease(self.store)

    def _busy(self, facts: dict[str, Any]) -> str:
        age = self._wall() - float(facts.get("renewed_at") or 0)
        return (
            f"{self.store.url} is being written by run {facts.get('owner', '?')} on "
            f"{facts.get('host', '?')} (its lease was renewed {age:.0f} s ago; a killed run's "
            f"lease frees the output {facts.get('ttl', LEASE_SECONDS):.0f} s after its last "
            "renewal); wait for it to finish"
        )

    def renew(self) -> None:
        started = self._clock()
        try:
            self.version = self.store.put_if_version(LEASE_NAME, self._body(), self.version)
        except (VersionMismatch, FileNotFoundError):
            raise LeaseLost(f"{self.store.url}: another run took over the lease") from None
        self.confirmed = started

    def check(self) -> None:
        if self._clock() - self.confirmed > self.ttl * LAPSE:
            raise LeaseLost(
                f"{self.store.url}: the lease could not be renewed for {self.ttl:.0f} s; "
                "another run may be writing now"
            )

    def share(self) -> None:
        """The run's own writers may write beside its holder: they check the lease is still
        the run's (`RunLease`); the holder keeps renewing it (`sink.shared_output`)."""

    def release(self) -> None:
        if not self.version:
            return
        version, self.version = self.version, ""
        try:
            self.store.delete_if_version(LEASE_NAME, version)
        except (VersionMismatch, OSError) as exc:  # it expires anyway
            log.warning("%s: lease not released (%s); it expires by itself", self.store.url, exc)


def holder_gone(facts: dict[str, Any]) -> bool:
    """A lease whose holder provably died: it ran on this machine (same host name) and its
    process no longer exists. No watch is needed then, so a reader finishes a killed
    compaction (or commits a killed run's journal) at once instead of after 2 x the TTL.
    A holder on another machine cannot be checked: its lease is watched or waited out."""
    if facts.get("host") != socket.gethostname():
        return False
    pid = facts.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False  # alive (or its number reused: then we only wait, as before)


class RunLease(WriterLock):
    """A writer of the run that holds an object-store output's lease (the Ray engine's workers
    beside their driver), as a shared `flock` is on disk.

    The driver takes the `Lease` as any run does and keeps renewing it; a writer named
    `<run id>.<suffix>` writes beside it as long as the lease names that run. It checks so when
    it starts (refused, as `OutputDirBusy`, when the output is another run's or nobody's) and
    every third of the TTL after; a lease gone or held by another run (the driver died and
    another run took over) is `LeaseLost`, and a check that could not be made for most of a
    TTL stops the writer as a lost lease does (`check`). It writes nothing itself: the lease
    has one writer, its holder. (On disk the kernel keeps a dead run's shared locks from
    outliving it; here a writer whose driver died stops within a TTL, and Ray ends the actors
    of a driver that exits.)
    """

    def __init__(
        self,
        store: ObjectStore,
        writer: str,
        ttl: float = LEASE_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.run = writer.split(".", 1)[0]
        self.ttl = ttl
        self.renew_every = ttl / 3
        self.confirmed: float | None = None  # monotonic time the lease was last seen the run's
        self._clock = clock

    def renew(self) -> None:
        started = self._clock()
        held = read_lease(self.store)
        owner = held[0].get("owner") if held is not None else None
        if owner == self.run:
            self.confirmed = started
            return
        if self.confirmed is None:  # starting: the output is not this run's to write
            where = self.store.join(LEASE_NAME)
            raise OutputDirBusy(
                f"{self.store.url}: run {self.run} does not hold the output "
                f"({where}: {'held by run ' + str(owner) if held else 'absent'})"
            )
        raise LeaseLost(f"{self.store.url}: run {self.run} lost the lease (now {owner or 'none'})")

    def check(self) -> None:
        if self.confirmed is None or self._clock() - self.confirmed > self.ttl * LAPSE:
            raise LeaseLost(
                f"{self.store.url}: the lease of run {self.run} could not be confirmed for "
                f"{self.ttl:.0f} s; another run may be writing now"
            )

    def release(self) -> None:
        """Nothing to give back: the lease is the driver's."""
