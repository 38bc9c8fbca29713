"""Where a batch job's input goes, how the job is made and found, and how its output is read:
the one part of the Batch Mode flow (submit.py, jobs.py) that differs between the backends.

    Developer API (Batch Mode)           Vertex AI (batch prediction)
    input:  a Files API upload           a JSONL written under [api] batch_staging (gs://)
    create: batches:batchGenerateContent projects.locations.batchPredictionJobs.create
    find:   every job listed, matched    the list filtered by display name
    output: the responses file (or the   predictions*.jsonl under the job's
            inline answers)              outputInfo.gcsOutputDirectory
    files:  Files API deletes            the staged input and the output folder deleted

Both read the same lines (`{"key", "request"}` in, the key back in each result) into the same
rows. A Vertex job is ready to collect only once its predictions are all there: the folder is
named while the job runs, so a job SUCCEEDED whose files are not all written yet (fewer lines
than its completionStats count) is not ready — polled again, never read as empty.

The staging prefix is used through gcsfs, which retries a transient HTTP failure itself and then
raises its HttpError (not an OSError). Each staging call is tried again on a failure
`stores.transient` calls passing (I/O errors, HTTP 408, 429, 5xx, a request that timed out under
`[storage]`'s bounds: the rule inputs/fetch.py reads objects by), up to STAGING_ATTEMPTS; any
other, or one that outlasts them, is `StagingFailed`: the run stops naming the URI and the
store's HTTP status or "timed out" (a job already created stays in flight and the next run
re-attaches to it), a delete keeps the name for a later try. Writing the local
copy of a job's predictions is this machine's part, not the store's: its failure (a full disk, a
folder this user may not write) is `LocalWriteFailed` (gemini/batches.py's ResultsFile), never
tried again here nor blamed on the bucket (jobs.py stops the run naming the local file). So is
reading the batch input before it is staged: `LocalReadFailed`, the run stopped naming the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.gemini import GeminiClient
from pipeline.gemini.backends import Vertex
from pipeline.gemini.batches import JSONL_MIME, Batches, BatchJob, ResultsFile, os_reason
from pipeline.gemini.vertex_batches import VertexBatches
from pipeline.output import stores
from pipeline.output.state import State
from pipeline.output.stores import MissingExtra, filesystem
from pipeline.run.calls import RunStopped
from pipeline.run.failures import Action, Verdict

log = logging.getLogger(__name__)
INPUT = "input.jsonl"  # a Vertex job's staged input: {batch_staging}/{display name}/input.jsonl
OUTPUT = "output/"  # ... and the prefix its predictions are written under
PREDICTIONS = "predictions"  # the service's output files: predictions*.jsonl
CHUNK = 1024 * 1024  # bytes copied at once from a predictions file to the local results file
STAGING_ATTEMPTS = 3  # tries of a staging call failing transiently (gcsfs retried each ~30 s)
STAGING_BACKOFF_S = 2.0  # the pause before the second try, doubled before each later one
T = TypeVar("T")


class JobService(Protocol):
    """A backend's side of a batch job (see the module docstring)."""

    @property
    def batches(self) -> Batches | VertexBatches: ...  # get, cancel, results

    async def put_input(self, path: Path, display_name: str, job: int, state: State) -> str: ...

    async def create(self, model: str, source: str, display_name: str) -> BatchJob: ...

    async def find(self, display_name: str) -> BatchJob | None: ...

    async def fetch(self, remote: BatchJob, destination: Path, *, whole: bool = True) -> bool: ...

    async def delete_file(self, name: str) -> None: ...


def job_service(client: GeminiClient, staging: str | None, source: str = "") -> JobService:
    """The backend's service; ConfigError when a Vertex run has no staging prefix."""
    if not isinstance(client.backend, Vertex):
        return DeveloperJobs(client)
    if not staging:
        raise ConfigError(f"{source}: {STAGING_KEY} is required for Vertex batch prediction")
    try:
        return VertexJobs(client.batch_predictions, staging)
    except ValueError as exc:  # express mode: no project
        raise ConfigError(f"{source}: [api] project: {exc}") from None
    except MissingExtra as exc:  # no gcsfs to write the staging prefix with
        raise ConfigError(f"{source}: {STAGING_KEY}: {exc}") from None


STAGING_KEY = '[api] batch_staging ("gs://bucket/prefix")'


class DeveloperJobs:
    """Batch Mode on the Developer API: the input uploaded through the Files API."""

    def __init__(self, client: GeminiClient) -> None:
        self.client = client
        self.batches = client.batches

    async def put_input(self, path: Path, display_name: str, job: int, state: State) -> str:
        """The JSONL as an ACTIVE file of the service, recorded as the job's; its name."""
        info = await self.client.upload_file(path, JSONL_MIME, display_name=display_name)
        state.add_batch_file(job, info.name)
        if info.state != "ACTIVE":
            info = await self.client.wait_until_active(info.name)
        return info.name

    async def create(self, model: str, source: str, display_name: str) -> BatchJob:
        return await self.batches.create(model, file_name=source, display_name=display_name)

    async def find(self, display_name: str) -> BatchJob | None:
        jobs = await self.batches.list()
        return next((job for job in jobs if job.display_name == display_name), None)

    async def fetch(self, remote: BatchJob, destination: Path, *, whole: bool = True) -> bool:
        """The responses file to `destination` (an inline job's answers need none)."""
        if remote.responses_file:
            await self.batches.download(remote.responses_file, destination)
        return True

    async def delete_file(self, name: str) -> None:
        await self.client.delete_file(name)


class StagingFailed(OSError):
    """A staging call the store refused, or that failed transiently past every try: the URI
    and the store's failure (`stores.failure_text`: its HTTP status, never a credential)."""

    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(f"{where}: {stores.failure_text(exc)}")


class VertexJobs:
    """Batch prediction on Vertex AI: input and output in Cloud Storage, through the project's
    object-store layer (gcsfs, the `[vertex]` / `[cloud]` extras). `fs` and `sleep`: another
    fsspec filesystem, and the pause between tries (tests)."""

    def __init__(
        self,
        batches: VertexBatches,
        staging: str,
        *,
        fs: Any = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.batches = batches
        self.staging = staging.rstrip("/")
        self.fs = fs if fs is not None else filesystem("gs")
        self._sleep = sleep

    async def _store(self, where: str, call: Callable[[], T]) -> T:
        """`call` (gcsfs blocks) in a thread, tried again while its failure is transient;
        StagingFailed naming `where` when it is not, or when the tries ran out."""
        try:
            return await stores.retried(
                lambda: asyncio.to_thread(call),
                STAGING_ATTEMPTS,
                lambda attempt: STAGING_BACKOFF_S * 2**attempt,
                self._sleep,
                on_retry=lambda exc: log.info(
                    "%s: %s; trying again", where, stores.failure_text(exc)
                ),
            )
        except Exception as exc:
            if stores.transient(exc) is None:  # neither an I/O error nor the store's answer
                raise
            raise StagingFailed(where, exc) from None

    def _uri(self, display_name: str, name: str) -> str:
        return f"{self.staging}/{display_name}/{name}"

    async def put_input(self, path: Path, display_name: str, job: int, state: State) -> str:
        """The JSONL written to the staging prefix; the input and the output prefix recorded
        as the job's files first (a kill after the write still finds them to delete)."""
        uri = self._uri(display_name, INPUT)
        try:
            await asyncio.to_thread(_read_through, path)
        except LocalReadFailed as exc:
            raise RunStopped(_not_read(exc)) from None
        state.add_batch_file(job, uri)
        state.add_batch_file(job, self._uri(display_name, OUTPUT))
        try:
            await self._store(uri, lambda: self.fs.put_file(str(path), _path(uri)))
        except StagingFailed as exc:
            raise RunStopped(_staging_failed(exc)) from None
        return uri

    async def create(self, model: str, source: str, display_name: str) -> BatchJob:
        output = self._uri(display_name, OUTPUT).rstrip("/")
        return await self.batches.create_job(
            model, source_uri=source, output_prefix=output, display_name=display_name
        )

    async def find(self, display_name: str) -> BatchJob | None:
        jobs = await self.batches.list(display_name=display_name)
        return next((job for job in jobs if job.display_name == display_name), None)

    async def fetch(self, remote: BatchJob, destination: Path, *, whole: bool = True) -> bool:
        """Every predictions file of the job into `destination`; False (nothing kept) while
        they hold fewer lines than the job says it answered (`whole`; else while none is there
        yet), or none is there yet."""
        folder = remote.output_dir
        if not folder:
            return False
        try:
            return await self._store(folder, lambda: self._copy(remote, destination, whole))
        except StagingFailed as exc:
            raise RunStopped(_staging_failed(exc)) from None

    def _copy(self, remote: BatchJob, destination: Path, whole: bool = True) -> bool:
        try:
            return self._copied(remote, destination, whole)
        except FileNotFoundError:  # a folder or file not there yet: not ready
            return False

    def _copied(self, remote: BatchJob, destination: Path, whole: bool) -> bool:
        files = self._predictions(remote.output_dir or "")
        lines = 0
        with ResultsFile(destination) as sink:
            for name in files:
                lines += _append(self.fs, name, sink)
        expected = remote.stats.succeeded + remote.stats.failed
        short = lines < expected if whole else not lines
        if not files or short:
            destination.unlink()
            log.info("%s: %d of %d predictions written so far", remote.name, lines, expected)
            return False
        return True

    def _predictions(self, folder: str) -> list[str]:
        found = self.fs.find(_path(folder), withdirs=False)
        return sorted(p for p in found if p.rsplit("/", 1)[-1].startswith(PREDICTIONS))

    async def delete_file(self, name: str) -> None:
        """A staged input, or (a name ending in "/") everything under the output prefix;
        StagingFailed (an OSError: the name is kept for a later try) when the store fails."""
        await self._store(name, lambda: self._delete(name))

    def _delete(self, name: str) -> None:
        paths = self._under(name) if name.endswith("/") else [_path(name)]
        for path in paths:  # one DELETE each (gcsfs's rm of many uses the batch endpoint)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _under(self, prefix: str) -> list[str]:
        """The objects under a prefix (none when its bucket is gone: nothing to delete)."""
        try:
            return list(self.fs.find(_path(prefix), withdirs=False))
        except FileNotFoundError:
            return []


class LocalReadFailed(Exception):
    """The batch input could not be read on this machine (a disk error, a file this user may
    not read): its failure, not the store's. Not an OSError on purpose: `stores.retried` would
    read it as the store's I/O error, and the stop would blame the staging prefix."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"{path}: {os_reason(exc)}")


def _read_through(path: Path) -> None:
    """Read the JSONL once, all of it, before gcsfs does (it opens and reads it inside the
    upload, where a local error reads as the store's): the extra local read costs little beside
    the upload, and the page cache serves gcsfs's. A disk that fails between the two reads is
    still blamed on the staging prefix."""
    try:
        with open(path, "rb") as source:
            while source.read(CHUNK):
                pass
    except OSError as exc:
        raise LocalReadFailed(path, exc) from None


def _not_read(exc: LocalReadFailed) -> Verdict:
    return Verdict(
        Action.RUN,
        f"the batch input cannot be read on this machine: {exc}",
        exits.STOPPED,
        "check the disk (or the file's permissions) and rerun: nothing was sent or bought",
    )


def _path(uri: str) -> str:
    """gs://bucket/key -> bucket/key, as gcsfs names objects."""
    return uri.split("://", 1)[-1]


def _append(fs: Any, path: str, sink: Any) -> int:
    """Copy one predictions file to `sink`, ending it with a newline; its non-blank lines."""
    lines, last, open_line = 0, b"\n", False  # open_line: the line being read is not blank
    with fs.open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            sink.write(chunk)
            *ended, rest = chunk.split(b"\n")
            for part in ended:
                lines += open_line or bool(part.strip())
                open_line = False
            open_line = open_line or bool(rest.strip())
            last = chunk[-1:]
    if last != b"\n":
        sink.write(b"\n")
    return lines + open_line


def _staging_failed(exc: StagingFailed) -> Verdict:
    return Verdict(
        Action.RUN,
        f"the batch staging prefix cannot be used: {exc}",
        exits.STOPPED,
        f"check {STAGING_KEY} and that the credentials may read and write objects there",
    )
