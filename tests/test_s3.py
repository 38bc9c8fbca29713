"""Runs whose inputs and outputs live in buckets of a real S3 implementation (moto's server on
loopback), against the local Gemini server: listing and reading a bucket, writing another, a
rerun that skips without reading, kill -9 and rerun, two runs on one output prefix, and a
missing `cloud` extra."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.cli import main
from pipeline.commands.estimate import estimate
from pipeline.commands.render import render
from pipeline.commands.status import status
from pipeline.config import ConfigError, parse_config
from pipeline.inputs.checks import require_inputs
from pipeline.inputs.source import walk
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output import journal
from pipeline.output.parts import current_rows, part_entries
from pipeline.output.stores import LEASE_NAME, OutputDirBusy, filesystem, open_store
from tests.conftest import REPO, child_env, put_images, run, scene_png


def s3_config(tmp_path: Path, inputs: str, output: str, **sections: dict) -> object:
    data = {
        "api": {"base_url": "local", "model": "gemini-2.5-flash", "timeout": 20},
        "limits": {"concurrency": 4, "max_attempts": 4},
        "input": {"paths": [inputs]},
        "task": {"kind": "segment"},
        "output": {"dir": output, "flush_seconds": 1, "lease_seconds": 2},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "s3-config.toml", tmp_path)


async def test_a_run_reads_one_bucket_and_writes_another_and_a_rerun_reads_nothing(
    tmp_path: Path, s3_endpoint: str
) -> None:
    inputs, output = "s3://in-bucket-run/images", "s3://out-bucket-run/dataset"
    for name in ("in-bucket-run", "out-bucket-run"):
        filesystem("s3").mkdir(name)
    names = put_images(inputs, 7)
    filesystem("s3").pipe(f"{inputs}/notes.txt", b"not an image")
    config = s3_config(tmp_path, inputs, output, input={"include": ["*.png"]})
    require_inputs(config)

    guess = estimate(config)  # objects read through the fetcher
    assert (guess["images"], guess["unusable_files"]) == (7, 0)
    first = await run(config)
    assert first.api_calls == 7 and first.rows == {"ok": 7}
    assert guess["input_tokens"] == first.tokens["prompt_tokens"]  # the billed figure
    after = estimate(config)  # the plan read from the bucket: all done; its history too
    assert after["plan"]["nothing_to_do"] and after["plan"]["done"] == 7
    assert after["output_tokens_from"] == "7 earlier rows"
    gallery = render(output, tmp_path / "gallery")  # the pictures read from the input bucket
    assert (gallery["entries"], gallery["missing_sources"]) == (7, 0)
    rows = current_rows(output, ["image_root", "image_path", "status", "file_size"]).to_pylist()
    assert [r["image_path"] for r in rows] == names  # relative to the prefix, in key order
    assert {r["image_root"] for r in rows} == {inputs}
    store = open_store(output)
    stored = {entry.name for entry in store.list()}
    assert f".runs/{first.run_id}.json" in stored and ".state.sqlite" in stored
    assert any(name.startswith(".index/facts-") for name in stored)
    assert not any(name.startswith((".journal-", LEASE_NAME)) for name in stored)

    again = await run(config)
    assert (again.seen, again.skipped, again.api_calls) == (7, 7, 0)  # no object was read
    assert status(output)["rows"] == 7

    names += put_images(inputs, 2, start=7)  # new objects, and one rewritten in place
    filesystem("s3").pipe(f"{inputs}/{names[0]}", scene_png(seed=99))
    third = await run(config)
    assert (third.seen, third.skipped, third.api_calls) == (9, 6, 3)


def test_bucket_listing_follows_the_walks_rules_page_by_page(tmp_path: Path, bucket: str) -> None:
    """The same tree in a folder and in a bucket: the same files under the same patterns."""
    tree = ["a.jpg", "b/c.png", "b/.hidden.png", ".cache/x.png", "raw/d.tif", "raw/e.PNG", "z.txt"]
    fs = filesystem("s3")
    for name in tree:
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / name).write_bytes(b"x")
        fs.pipe(f"{bucket}/tree/{name}", b"x")
    fs.pipe(f"{bucket}/tree/folder-marker/", b"")
    for include, exclude in (
        (["*"], []),
        (["*.png"], ["raw"]),
        (["raw/*", "**/.*.png"], []),
    ):
        local = sorted(
            s.rel_path for s in walk([tmp_path / "tree"], include=include, exclude=exclude)
        )
        remote = list(walk([f"{bucket}/tree"], include=include, exclude=exclude))
        assert [s.rel_path for s in remote] == sorted(s.rel_path for s in remote)  # key order
        assert sorted(s.rel_path for s in remote) == local
        assert all(s.size == 1 and s.mtime_ns > 0 and s.path.startswith("s3://") for s in remote)


def test_listing_pages_through_a_big_prefix_lazily(bucket: str) -> None:
    from pipeline.inputs.source import walk_objects

    fs = filesystem("s3")
    for n in range(23):
        fs.pipe(f"{bucket}/many/{n:03d}.png", b"x")
    listing = walk_objects(f"{bucket}/many", page=5)
    first = next(listing)  # before the rest is listed
    assert first.rel_path == "000.png"
    assert [s.rel_path for s in listing] == [f"{n:03d}.png" for n in range(1, 23)]


async def test_two_runs_on_one_output_prefix_the_second_is_refused(
    tmp_path: Path, bucket: str
) -> None:
    put_images(f"{bucket}/images", 4)
    output = f"{bucket}/out"
    # long enough that the second run starts while the first still holds the output
    slow = s3_config(tmp_path, f"{bucket}/images", output, local={"latency_ms": 6000})
    first = asyncio.create_task(run(slow))
    store = open_store(output)
    deadline = asyncio.get_running_loop().time() + 20
    while store.info(LEASE_NAME) is None:  # polled only until the first run holds the output
        assert asyncio.get_running_loop().time() < deadline and not first.done()
        await asyncio.sleep(0.02)
    second = s3_config(tmp_path, f"{bucket}/images", output)
    with pytest.raises(OutputDirBusy, match="being written by run"):
        await run(second)
    summary = await first
    assert summary.rows == {"ok": 4}
    assert store.info(LEASE_NAME) is None  # released at the end


RUN = """
import asyncio, sys
from pipeline.config import load_config, with_overrides
from pipeline.engines import RunOptions, run
config = with_overrides(load_config(sys.argv[1]), {"api.base_url": sys.argv[2]})
run(config, RunOptions(progress=False, seed=0))
"""


async def test_kill_9_mid_run_on_a_bucket_and_rerun_pays_only_for_what_was_not_durable(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing duplicated, nothing re-paid beyond what was answered but not yet durable."""
    names = put_images(f"{bucket}/images", 30)
    output = f"{bucket}/out"
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f"""
[api]
model = "gemini-2.5-flash"
[limits]
concurrency = 4
[input]
paths = ["{bucket}/images"]
[task]
kind = "segment"
[output]
dir = "{output}"
rows_per_part = 8
flush_seconds = 60
lease_seconds = 1
"""
    )
    store = open_store(output)
    async with LocalServer(ServerOptions(latency_ms=400, seed=1)) as server:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RUN,
            str(config_file),
            server.base_url,
            cwd=REPO,
            env=child_env(GEMINI_API_KEY="test-key"),
        )
        deadline = asyncio.get_running_loop().time() + 60
        while not (journal.segments(store) and part_entries(store)):  # parts and a journal
            assert asyncio.get_running_loop().time() < deadline and child.returncode is None
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        await child.wait()
        durable = _durable_paths(store)
        journaled = sum(  # in segments whose part the kill left unwritten
            len(list(journal.read(store, segment)))
            for segment in journal.segments(store)
            if store.info(journal.part_for(segment)) is None
        )
        assert 0 < len(durable) < 30

        monkeypatch.setenv("GEMINI_API_KEY", "test-key")
        again = s3_config(tmp_path, f"{bucket}/images", output, api={"base_url": server.base_url})
        rerun = await run(again)
    assert rerun.recovered == journaled  # the killed run's journal, committed without a call
    # Paid again: exactly what was not durable at the kill (in flight, or answered in the last
    # sync interval: ~1 s, as on disk); what was durable was committed without a call. (The
    # rerun's own count: the server may still be billing the killed run's requests in flight.)
    assert rerun.api_calls == 30 - len(durable)
    assert rerun.skipped == len(durable)  # recovered first, then skipped like any committed row
    every = [r["image_path"] for r in _all_rows(store)]
    assert sorted(every) == names  # each image once: nothing duplicated


def _durable_paths(store) -> set[str]:
    """Images whose rows are in a part or in the journal (durable) right after the kill."""
    paths = {row["image_path"] for row in _all_rows(store)}
    for segment in journal.segments(store):
        paths.update(row["image_path"] for row in journal.read(store, segment))
    return paths


def _all_rows(store) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for entry in part_entries(store):
        with store.fs.open(store.join(entry.name), "rb") as file:
            rows.extend(pq.read_table(file, columns=["image_path"]).to_pylist())
    return rows


def test_state_lives_in_the_bucket_as_a_snapshot(bucket: str) -> None:
    from pipeline.output.state import State

    state = State(f"{bucket}/out")
    state.add_requests("2026-11-29", 5)
    state.close()  # a snapshot at close
    again = State(f"{bucket}/out")
    assert again.requests_on("2026-11-29") == 5
    again.add_requests("2026-11-29", 2)
    again.save()
    assert State(f"{bucket}/out").requests_on("2026-11-29") == 7
    # A table another module keeps (Batch Mode's jobs), written through `db` directly:
    again.db.execute("CREATE TABLE IF NOT EXISTS jobs (name TEXT)")
    again.db.execute("INSERT INTO jobs VALUES ('batches/123')")
    again.save()
    assert State(f"{bucket}/out").db.execute("SELECT name FROM jobs").fetchall() == [
        ("batches/123",)
    ]
    again.close()


# az:// (adlfs): the one store of the cloud extra the test extra leaves out (gcsfs is in it,
# for tests/test_vertex.py), so this runs wherever the tests do
@pytest.mark.skipif(importlib.util.find_spec("adlfs") is not None, reason="adlfs is installed")
def test_a_missing_extra_is_one_line_saying_what_to_install(tmp_path: Path) -> None:
    config = parse_config(
        {"input": {"paths": ["az://container/images"]}, "output": {"dir": str(tmp_path)}},
        "cfg.toml",
        tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        require_inputs(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install 'gemini-vision-pipeline[cloud]'" in message and "adlfs" in message


def test_an_input_bucket_that_does_not_exist_is_a_usage_error(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a missing input folder is: exit 2 naming it, before anything runs (it was a traceback
    from the walking thread)."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[api]\nbase_url = "local"\n[input]\npaths = ["s3://no-such-bucket-here/images"]\n'
        f'[output]\ndir = "{bucket}/out"\n'
    )
    assert main(["run", str(config), "--quiet"]) == exits.USAGE
    error = capsys.readouterr().err
    assert "[input] paths: s3://no-such-bucket-here/images: no such bucket" in error
    assert "Traceback" not in error
    assert main(["estimate", str(config)]) == exits.USAGE


@pytest.mark.parametrize(
    "command", [["status"], ["export", "coco"], ["render"], ["reparse"], ["compact"]]
)
def test_readers_of_an_output_that_is_not_there_say_so(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A typo in an output's name is exit 2 naming it, not an empty report: a folder that does
    not exist, a bucket that does not exist, a prefix nothing was written under."""
    extra = ["--out", str(tmp_path / "x")] if command[0] in ("export", "render") else []
    for where, why in (
        (str(tmp_path / "typo"), "no such output folder"),
        ("s3://no-such-bucket-here/out", "no such bucket"),
        (f"{bucket}/never-written", "nothing there"),
    ):
        assert main([*command, where, *extra]) == exits.USAGE, where
        assert f"{where}: {why}" in capsys.readouterr().err


async def test_an_object_gone_since_its_listing_is_an_error_row_that_names_no_signature(
    bucket: str,
) -> None:
    from pipeline.inputs.fetch import Fetcher, FetchError
    from pipeline.inputs.source import walk_objects

    put_images(f"{bucket}/gone", 2)
    first, second = walk_objects(f"{bucket}/gone")
    filesystem("s3").rm(second.path)
    with Fetcher() as fetcher:
        assert (await fetcher.read(first)).startswith(b"\x89PNG")  # a presigned GET
        with pytest.raises(FetchError) as gone:
            await fetcher.read(second)
    assert str(gone.value) == "HTTP 404 Not Found" and not gone.value.retryable


async def test_an_output_inside_the_input_prefix_is_never_read_as_input(
    tmp_path: Path, bucket: str
) -> None:
    put_images(f"{bucket}/data", 3)
    config = s3_config(tmp_path, bucket, f"{bucket}/data/out")  # the whole bucket as input
    first = await run(config)
    assert first.rows == {"ok": 3}
    again = await run(config)  # the parts, the journal, runs/: none is an input
    assert (again.seen, again.skipped, again.api_calls) == (3, 3, 0)


async def test_reads_ahead_within_their_byte_budget(bucket: str) -> None:
    from pipeline.inputs.fetch import Fetcher, FetchSettings
    from pipeline.inputs.source import walk_objects

    put_images(f"{bucket}/ahead", 3)
    sources = list(walk_objects(f"{bucket}/ahead"))
    budget = sources[0].size + sources[1].size  # room for two of the three
    with Fetcher(FetchSettings(ahead_bytes=budget)) as fetcher:
        for src in sources:
            fetcher.prefetch(src)
        assert fetcher._ahead_bytes == budget and len(fetcher._ahead) == 2
        bodies = [await fetcher.read(src) for src in sources]  # the third read on demand
        assert fetcher._ahead_bytes == 0 and not fetcher._ahead
    assert [len(body) for body in bodies] == [src.size for src in sources]
    assert fetcher.fetched == 3


async def test_a_reference_image_in_a_bucket(tmp_path: Path, bucket: str) -> None:
    """A reference image may be an object: read once through the fetcher, sent with every
    request; a missing one stops the run before its first call, naming it."""
    put_images(f"{bucket}/images", 3)
    filesystem("s3").pipe(f"{bucket}/examples/weld.png", scene_png(seed=40))
    reference = {"image": f"{bucket}/examples/weld.png", "caption": "an example"}
    config = s3_config(
        tmp_path,
        f"{bucket}/images",
        f"{bucket}/out",
        task={"kind": "detect", "reference_images": [reference]},
    )
    summary = await run(config)
    assert (summary.api_calls, summary.rows) == (3, {"ok": 3})
    alone = s3_config(tmp_path, f"{bucket}/images", f"{bucket}/alone", task={"kind": "detect"})
    plain = await run(alone)
    assert summary.tokens["prompt_tokens"] > plain.tokens["prompt_tokens"]  # it went along
    missing = {"image": f"{bucket}/examples/gone.png"}
    gone = s3_config(
        tmp_path, f"{bucket}/images", f"{bucket}/gone", task={"reference_images": [missing]}
    )
    with pytest.raises(ConfigError, match=r"reference_images: s3://.*/gone.png: HTTP 404"):
        await run(gone)
