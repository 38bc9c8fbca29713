"""gs:// requests that stall: gcsfs, through the local server's storage API, given a bounded
connect and idle-read timeout (`[storage] connect_seconds`, `read_seconds`); a request that
times out is retried as a store's transient failure is, and when the tries run out the run
stops naming the URI and "timed out". The double's `storage_stall` takes a request and never
answers it (a download: half its bytes), until the client gives up or the server stops.

Reuses tests/test_vertex_batch.py's server (its `faults` mark adds the double's options).
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator

import pytest

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.engines.batch import service
from pipeline.gemini import GeminiClient
from pipeline.gemini.backends import Vertex
from pipeline.output.fsutil import AlreadyExists
from pipeline.output.state import State
from pipeline.output.stores import (
    Timeouts,
    VersionMismatch,
    failure_text,
    filesystem,
    open_store,
    timeout_text,
    transient,
    use_timeouts,
)
from pipeline.run.calls import RunStopped
from tests.conftest import bounded, child_env, make_config, read_rows, run, save_scenes
from tests.test_batch_run import jobs_in
from tests.test_vertex_batch import (  # and that module's fixtures, reused (__all__)
    FAST,
    LOCATION,
    PROJECT,
    STAGING,
    buckets,
    created,
    gcs_double,
    key_file,
    key_path,
    server_clock,
    server_options,
    staging,
    vertex_env,
)

__all__ = [
    "buckets",
    "gcs_double",
    "key_file",
    "key_path",
    "server_clock",
    "server_options",
    "staging",
    "vertex_env",
]
SECRET_MARKS = ("Bearer", "ya29.", "private_key", "test-key")  # what must never be shown


@pytest.fixture(autouse=True)
def default_timeouts() -> Iterator[None]:
    """A run here sets this process's store bounds from its config (tiny ones): the next test
    in this worker gets the defaults back."""
    yield
    use_timeouts(Timeouts())


@pytest.fixture
def gcsfs_no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs retries a timed-out request 6 times, pausing 1, 2, 4, 8, 16 s (+ jitter) between
    (`retry_request`, its count fixed when the class is made): no setting shortens it, so a
    test whose request stalls every time takes gcsfs's pauses away (its tries stay)."""
    gcs_retry = pytest.importorskip("gcsfs.retry")

    async def at_once(_seconds: float) -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(gcs_retry, "asyncio", types.SimpleNamespace(sleep=at_once))


@pytest.mark.faults(storage_stall=("downloadx1",))
async def test_a_stalled_gs_read_is_given_up_and_read_again(
    server, tmp_path, buckets, gcs_double, monkeypatch
):
    """The first object read stops after half its bytes and the server sends nothing more:
    the read gives up after `[storage] read_seconds` and is made again (by gcsfs's own retry,
    the fetcher's `stores.retried` behind it), and every image is answered — no error row."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    (buckets / "day1").mkdir()
    save_scenes(buckets / "day1", 2, prefix="scene", seed=91)
    config = make_config(
        tmp_path,
        api={"base_url": server.base_url},
        input={"paths": ["gs://photos/day1"]},
        storage={"read_seconds": 1.0},  # the stalled read's; others answer well within it
    )
    summary = await bounded(run(config), "the run over a stalling bucket", seconds=60)

    assert summary.rows["ok"] == 2 and summary.exit_code == exits.OK
    assert {row["status"] for row in read_rows(tmp_path / "out")} == {"ok"}
    assert server.stats()["storage"]["stalls"] == 1


@pytest.mark.faults(storage_stall=("upload",))
async def test_a_staging_write_that_always_stalls_stops_the_run_naming_it_timed_out(
    server, tmp_path, images_dir, vertex_env, gcs_double, gcsfs_no_backoff
):
    """Every upload of the batch input is taken and never answered: each try gives up after
    `read_seconds`, gcsfs's 6 tries and the staging's STAGING_ATTEMPTS are spent, and the run
    stops (exit 3) naming the staging URI and "timed out" — no job made, nothing paid, and no
    traceback or credential in what it says."""
    save_scenes(images_dir, 2, prefix="scene", seed=92)
    api = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    api |= {"location": LOCATION, "mode": "batch", "batch_staging": STAGING}
    config = make_config(tmp_path, api=api, batch=FAST, storage={"read_seconds": 0.2})
    summary = await bounded(run(config), "the run whose staging stalls", seconds=90)

    assert summary.exit_code == exits.STOPPED, summary.stop_reason
    reason = summary.stop_reason or ""
    assert f"{STAGING}/" in reason and "input.jsonl: timed out" in reason
    assert "[storage] read_seconds" in reason and "Traceback" not in reason
    assert not any(mark in reason for mark in SECRET_MARKS)
    tries = service.STAGING_ATTEMPTS * 6  # each staging try: gcsfs's 6
    assert server.stats()["storage"]["stalls"] == tries
    assert created(server) == 0 and jobs_in(tmp_path / "out") == []  # nothing sent, nothing owed


# ------------------------------------------------------------------- a gs:// output stalls
# The pipeline runs in a child process: the double answers from this test's event loop, which
# an in-process run's blocking store calls (fsspec's `sync`) would hold.
NO_BACKOFF = (  # gcsfs_no_backoff's, in the child
    "import asyncio, types\nimport gcsfs.retry\n"
    "async def at_once(_seconds):\n    await asyncio.sleep(0)\n"
    "gcsfs.retry.asyncio = types.SimpleNamespace(sleep=at_once)\n"
)


async def run_child(
    server,
    tmp_path,
    *,
    prelude: str = "",
    inputs: str = "",
    output: str = "gs://staging/out",
    read_seconds: float = 0.3,
) -> tuple[int, str]:
    """`pipeline run` over two images (local unless `inputs`) into `output`, store reads
    bounded to `read_seconds`: its exit code and stderr."""
    save_scenes(tmp_path / "images", 2, prefix="scene", seed=93)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[api]\nbase_url = "{server.base_url}"\n'
        f'[input]\npaths = ["{inputs or tmp_path / "images"}"]\n'
        f'[task]\nkind = "detect"\n[output]\ndir = "{output}"\n'
        f"[storage]\nread_seconds = {read_seconds}\n"
    )
    code = f"import sys\n{prelude}from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "run", str(config), "--quiet",
        env=child_env(GEMINI_API_KEY="test-key"), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await bounded(child.communicate(), "pipeline run on a stalling bucket", 120)
    return child.returncode or 0, err.decode()


@pytest.mark.faults(storage_stall=("uploadx1",))
async def test_a_stalled_write_to_a_gs_output_is_made_again(
    server, tmp_path, images_dir, staging, gcs_double
):
    """The output's first write (its lease) is taken and never answered: it is given up after
    `read_seconds` and made again, and the run writes its rows as usual."""
    status, stderr = await run_child(server, tmp_path, read_seconds=1.0)  # (a loaded machine)

    assert status == exits.OK, stderr
    assert server.stats()["storage"]["stalls"] == 1
    assert {row["status"] for row in read_rows(staging / "out")} == {"ok"}
    assert len(read_rows(staging / "out")) == 2


@pytest.mark.faults(storage_stall=("upload",))
async def test_a_gs_output_that_never_answers_a_write_stops_the_run_before_any_call(
    server, tmp_path, images_dir, staging, gcs_double
):
    """Every write is taken and never answered: the lease cannot be taken, gcsfs's 6 tries
    time out, and the run does not start (exit 3) naming the output and "timed out" — no
    traceback, no image bought."""
    status, stderr = await run_child(server, tmp_path, prelude=NO_BACKOFF)

    assert status == exits.STOPPED, stderr
    assert "not started: gs://staging/out: timed out" in stderr and "Traceback" not in stderr
    assert server.stats()["storage"]["stalls"] == 6
    assert server.stats()["answers_by_task"] == {}


@pytest.mark.faults(storage_stall=("list",))
async def test_an_input_folder_whose_listing_never_comes_stops_the_run_naming_it(
    server, tmp_path, buckets, images_dir, gcs_double
):
    """Every listing of the gs:// inputs is taken and never answered: the walk cannot go on,
    and the run stops (exit 3) naming the folder and "timed out", no traceback."""
    (buckets / "day1").mkdir()
    save_scenes(buckets / "day1", 2, prefix="scene", seed=94)
    status, stderr = await run_child(
        server,
        tmp_path,
        prelude=NO_BACKOFF,
        inputs="gs://photos/day1",
        output=str(tmp_path / "out"),
    )

    assert status == exits.STOPPED, stderr
    assert "stopped: gs://photos/day1: listing failed: timed out" in stderr
    assert "Traceback" not in stderr and server.stats()["storage"]["stalls"] == 6


async def test_gs_conditional_writes_refuse_a_taken_name_and_a_changed_version(
    server, staging, gcs_double
):
    """What a gs:// output's lease and parts rely on, against the double's `ifGenerationMatch`:
    gcsfs raises its 412 as a bare FileExistsError, read as AlreadyExists / VersionMismatch
    (it escaped as a FileExistsError before, and a lease renewal crashed on it)."""

    def conditional_writes() -> None:
        store = open_store("gs://staging/out")
        store.create_bytes("a.txt", b"1")
        with pytest.raises(AlreadyExists):
            store.create_bytes("a.txt", b"2")
        version = store.put_if_absent(".lease", b"mine")
        with pytest.raises(VersionMismatch):
            store.put_if_version(".lease", b"theirs", "12345")
        renewed = store.put_if_version(".lease", b"mine again", version)
        with pytest.raises(VersionMismatch):
            store.delete_if_version(".lease", version)
        store.delete_if_version(".lease", renewed)

    await asyncio.to_thread(conditional_writes)
    assert (staging / "out" / "a.txt").read_bytes() == b"1"
    assert not (staging / "out" / ".lease").exists()


async def test_a_batch_input_this_machine_cannot_read_is_named_as_local(tmp_path):
    """The JSONL is read here before it goes to the staging prefix: a local read failure stops
    the run naming the local file, not the bucket, and nothing is written there."""
    memory = filesystem("memory")
    backend = Vertex("https://localhost:1", PROJECT, LOCATION)
    client = GeminiClient(api_key="test-key", backend=backend)
    jobs = service.VertexJobs(client.batch_predictions, "gs://b/unread", fs=memory)
    unreadable = tmp_path / "input.jsonl"
    unreadable.mkdir()  # opening it for reading fails for every user, root too
    state = State(tmp_path / "out")
    job = state.add_batch_job("unread")
    with pytest.raises(RunStopped) as stopped:
        await jobs.put_input(unreadable, "unread", job, state)
    verdict = stopped.value.verdict
    assert f"{unreadable}: [Errno 21] Is a directory" in verdict.reason
    assert "on this machine" in verdict.reason and "gs://b/unread" not in verdict.reason
    assert verdict.exit_code == exits.STOPPED
    assert not memory.exists("b/unread")
    state.close()


def test_s3_filesystems_get_the_same_bounds_through_botocore():
    """s3fs hands `config_kwargs` to botocore's Config (no request made here)."""
    pytest.importorskip("s3fs")
    use_timeouts(Timeouts(connect_seconds=3, read_seconds=7))
    assert filesystem("s3").config_kwargs == {"connect_timeout": 3, "read_timeout": 7}


def test_a_timeout_is_named_with_the_bound_it_met():
    """aiohttp's own words say neither that a request timed out nor which bound it met."""
    aiohttp = pytest.importorskip("aiohttp")
    use_timeouts(Timeouts(connect_seconds=4, read_seconds=9))
    connect = aiohttp.ConnectionTimeoutError("Connection timeout to host http://x")
    read = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
    assert (
        timeout_text(connect)
        == "timed out connecting to the store (4 s, [storage] connect_seconds)"
    )
    assert (
        failure_text(read) == "timed out: the store sent nothing for 9 s ([storage] read_seconds)"
    )
    assert transient(connect) and transient(read)
    assert timeout_text(OSError("Connection reset by peer")) is None


@pytest.mark.parametrize("key", ["connect_seconds", "read_seconds"])
def test_a_storage_timeout_must_be_a_positive_number_naming_key_and_file(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"test-config.toml: \[storage\] {key}"):
        make_config(tmp_path, storage={key: 0})
