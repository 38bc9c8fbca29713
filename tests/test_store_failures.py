"""Failures the README promises a message and an exit code for, on a bucket as on disk (issue
19, items 8 and 11): a damaged part, a full disk, a missing Ray, and the three ways a bucket
cannot be used (no such bucket, no credentials, an endpoint that does not answer), each named
by its real cause. Real processes, moto's S3 server, real files."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.cli import main
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.parts import part_entries
from pipeline.output.stores import filesystem, open_store
from tests.conftest import REPO, child_env, put_images, save_scenes, until


def _cli(argv: list[str], *, prelude: str = "", **env: str) -> subprocess.CompletedProcess:
    """`pipeline ARGV` in a child process (its own environment and limits); `prelude` runs
    first in the child."""
    code = f"import sys\n{prelude}\nfrom pipeline.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _images(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    save_scenes(folder, count, prefix="a", seed=1)
    return folder


def _config(tmp_path: Path, inputs: str, output: str, *extra: str, api: str = "") -> Path:
    config = tmp_path / "run.toml"
    config.write_text(
        f'[api]\nbase_url = "local"\nmodel = "gemini-2.5-flash"\n{api}[input]\n'
        f'paths = ["{inputs}"]\n[task]\nkind = "segment"\n[output]\ndir = "{output}"\n'
        + "".join(extra)
    )
    return config


# ------------------------------------------------------------------------- 8a: damaged part
def test_a_damaged_part_on_a_bucket_is_exit_2_naming_the_object_and_how_to_set_it_aside(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """As on disk: exit 2, the object's URL, and the store's own command to move it aside (it
    was a pyarrow traceback, exit 1, from `run` and from `status`). `run` refuses to start, an
    error; `status` counts the readable parts and names the damaged one in its report."""
    put_images(f"{bucket}/images", 2)
    output = f"{bucket}/out"
    damaged = f"{output}/data/part-x-00000.parquet"
    filesystem("s3").pipe(damaged, b"not a parquet file at all")
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    config = _config(tmp_path, f"{bucket}/images", output)
    for argv, prefix in (
        (["status", output], "UNREADABLE PART (its rows are not counted above): "),
        (["run", str(config), "--quiet"], "error: "),
    ):
        assert main(argv) == exits.USAGE, argv
        out, error = capsys.readouterr()
        said = out if argv[0] == "status" else error
        assert "Traceback" not in out + error
        assert f"{prefix}{damaged}: not a readable Parquet file" in said
        assert f"aws s3 mv '{damaged}' '{damaged}.corrupt'" in said


def test_fsspecs_advice_about_a_damaged_footer_is_not_printed() -> None:
    """The damaged part is named with its remedy (above); fsspec's own warning about its footer
    ("Try setting footer_sample_size") is not printed beside it. In a child process: pytest
    records warnings itself, so in this one the filter could not be seen at work."""
    said = "Not enough data was used to sample the parquet footer. Try setting footer_sample_size"
    warn = "warnings.warn_explicit({!r}, UserWarning, 'parquet.py', 242, module='fsspec.parquet')"
    code = f"import warnings, pipeline.output.stores\n{warn.format(said)}\n{warn.format('another')}"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "footer_sample_size" not in done.stderr
    assert "UserWarning: another" in done.stderr  # fsspec's other warnings still show


# --------------------------------------------------------------------- 11: why no bucket
def test_no_bucket_no_credentials_and_a_dead_endpoint_are_each_named(
    tmp_path: Path, bucket: str, s3_endpoint: str
) -> None:
    """All three were "no such bucket" (fsspec's `exists` answers False to any error)."""
    where = "s3://no-such-bucket-here/out"
    no_credentials = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    unused_port = "http://127.0.0.1:9"  # discard: nothing listens there
    for env, said in (
        ({}, f"{where}: no such bucket"),
        (no_credentials, f"{where}: no credentials for s3:// (set AWS_ACCESS_KEY_ID"),
        # (one attempt: botocore's retries of a refused connection took 17 s of this test)
        (
            {"AWS_ENDPOINT_URL": unused_port, "AWS_MAX_ATTEMPTS": "1"},
            f"{where}: the s3:// endpoint does not answer",
        ),
    ):
        done = _cli(["status", where], **env)
        assert done.returncode == exits.USAGE, done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr
        if env:
            assert "no such bucket" not in done.stderr
    # A run says the same (its inputs' bucket is checked first, then its output's).
    config = _config(tmp_path, f"{bucket}/images", f"{bucket}/out")
    done = _cli(["run", str(config), "--quiet"], GEMINI_API_KEY="test-key", **no_credentials)
    assert done.returncode == exits.USAGE, done.stderr
    assert "no credentials for s3://" in done.stderr and "Traceback" not in done.stderr


# -------------------------------------------------------------------------- 8c: Ray missing
def test_engine_ray_without_ray_is_one_line_saying_what_to_install(tmp_path: Path) -> None:
    """As an s3:// path without the cloud extra: exit 2, one line (was a ModuleNotFoundError
    traceback, exit 1)."""
    config = _config(tmp_path, str(_images(tmp_path, 1)), str(tmp_path / "out"))
    done = _cli(
        ["run", str(config), "--engine", "ray", "--quiet"],
        prelude="sys.modules['ray'] = None  # as if Ray were not installed",
        GEMINI_API_KEY="test-key",
    )
    assert done.returncode == exits.USAGE, done.stderr
    assert done.stderr.strip().splitlines() == [
        f'error: {config}: [engine] kind = "ray" (--engine ray) needs the ray package: '
        "pip install 'gemini-vision-pipeline[ray]'"
    ]


# -------------------------------------------------------------------------- 8b: a full disk
@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 256 KiB filesystem (tmpfs), so that writes fail with ENOSPC where they would on
    a full disk; skipped where this process may not mount one (not root)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize(
    "used_kib",
    [
        80,  # room for the state and the parts; the run's summary does not fit (a traceback)
        90,  # a part's commit fails while the journal's next write does ("Task exception
        # was never retrieved": the failed commit's traceback printed at exit)
        150,  # no room for the state (was "cannot be read ... move it aside", exit 2)
    ],
)
def test_a_full_disk_stops_the_run_with_exit_3_and_says_free_the_disk(
    tmp_path: Path, tiny_disk: Path, used_kib: int
) -> None:
    """The README's exit 3 (stopped early: rerun to resume) with a "free the disk" hint, where
    it was a traceback with exit 1, or a misleading "move state.sqlite aside" with exit 2."""
    (tiny_disk / "filler").write_bytes(bytes(used_kib * 1024))
    config = _config(
        tmp_path, str(_images(tmp_path, 40)), str(tiny_disk / "out"), "rows_per_part = 5\n"
    )
    done = _cli(["run", str(config), "--quiet"], GEMINI_API_KEY="test-key")
    assert done.returncode == exits.STOPPED, done.stderr
    assert "Traceback" not in done.stderr and "move it aside" not in done.stderr
    assert "free the disk" in done.stderr


# ------------------------------------------------------------------- 11: a lost lease named
async def test_a_run_stopped_past_its_lease_says_the_lease_was_lost(
    tmp_path: Path, bucket: str
) -> None:
    """SIGSTOP a run on a bucket, let another writer take its lease over (a whole TTL without
    renewal), SIGCONT: the run stops with exit 3 naming the lost lease. It blamed a service
    outage: the deadlines of its calls in flight (2 s) had passed while it was stopped, eight
    in a row."""
    put_images(f"{bucket}/images", 60)
    output = f"{bucket}/out"
    config = _config(
        tmp_path,
        f"{bucket}/images",
        output,
        "lease_seconds = 2\nflush_seconds = 1\nrows_per_part = 4\n",
        "[limits]\nconcurrency = 8\nmax_attempts = 1\n",
        api="timeout = 2\n",
    )
    store = open_store(output)
    async with LocalServer(ServerOptions(latency_ms=1500, seed=1)) as server:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(config),
            "--quiet",
            "--base-url",
            server.base_url,
            cwd=REPO,
            env=child_env(GEMINI_API_KEY="test-key"),
            stderr=asyncio.subprocess.PIPE,
        )
        await until(lambda: part_entries(store), exited=lambda: child.returncode)
        child.send_signal(signal.SIGSTOP)
        # Another run takes the output over: it watches the stopped run's lease for a TTL.
        taken = await asyncio.to_thread(store.lock, "another-run", ttl=2)
        child.send_signal(signal.SIGCONT)
        _, err = await child.communicate()
        taken.release()
    said = err.decode()
    assert child.returncode == exits.STOPPED, said
    assert (
        "stopped: the output's lease was lost: another run may have taken it. rerun (once that "
        "run has finished)" in said
    )
    assert "outage" not in said and "free the disk" not in said
