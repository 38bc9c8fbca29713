"""The `pipeline` command as users run it: real processes, signals, kill -9 and resume."""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import _collecting_less, main
from tests.conftest import REPO, child_env, draw_shapes, read_rows

ENV = child_env()


def pipeline(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode not in (0, 1):
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def write_config(path: Path, images: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"""
[api]
base_url = "local"
model = "gemini-2.5-flash"
[limits]
concurrency = 4
[input]
paths = ["{images}"]
[task]
kind = "segment"
[output]
dir = "{out}"
rows_per_part = 3
flush_seconds = 0.2
{extra}
"""
    )
    return path


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll a condition on the file system (not a sleep standing in for a timing guess)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_demo_config_writes_parquet(tmp_path: Path) -> None:
    result = pipeline("run", "configs/demo.toml", "--output", str(tmp_path / "demo"), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "demo")
    truth = json.loads((REPO / "data" / "samples-truth.json").read_text())
    assert sorted(r["image_path"] for r in rows) == sorted(truth)
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        assert len(row["objects"]) == len(truth[row["image_path"]]["shapes"]), row["image_path"]
    status = pipeline("status", str(tmp_path / "demo"), "--config", "configs/demo.toml")
    assert f"status: ok {len(truth)}" in status.stdout
    assert f"remaining under configs/demo.toml: 0 of {len(truth)} files" in status.stdout


def test_config_errors_name_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nrpm = "fast"\n')
    result = pipeline("run", str(bad), check=False)
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "[limits] rpm" in result.stderr
    bad.write_text("[task]\nkind = 'detect'\ncolour = 'red'\n")
    result = pipeline("run", str(bad), check=False)
    assert result.returncode == 2 and "[task] colour" in result.stderr
    assert "Traceback" not in result.stderr


def _slow_run(tmp_path: Path, count: int) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(count):
        draw_shapes(256, 256, seed=500 + i, count=2)[0].save(images / f"k{i:03d}.png")
    config = write_config(
        tmp_path / "slow.toml", images, tmp_path / "out", "[local]\nlatency_ms = 300\nseed = 3\n"
    )
    return config, tmp_path / "out"


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def _parts(out: Path) -> list[Path]:
    return list(out.glob("data/*.parquet")) if out.exists() else []


def _answered(out: Path) -> bool:
    """Some answers are durable: in a part, or in the journal."""
    return out.exists() and bool(_parts(out) or list(out.glob(".journal-*")))


def test_kill_9_then_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config, out = _slow_run(tmp_path, 40)
    proc = _start(config)
    wait_for(lambda: len(_parts(out)) >= 2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    committed = read_rows(out)
    assert 0 < len(committed) < 40
    assert max(Counter(r["image_path"] for r in committed).values()) == 1

    result = pipeline("run", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    counts = Counter(r["image_path"] for r in rows)
    assert sorted(counts) == [f"k{i:03d}.png" for i in range(40)]
    assert set(counts.values()) == {1}, "a committed row was redone or duplicated"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_and_says_how_to_resume(tmp_path: Path, sig: int) -> None:
    config, out = _slow_run(tmp_path, 40)
    proc = _start(config)
    wait_for(lambda: _answered(out))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "resume" in stderr
    done = read_rows(out)
    assert 0 < len(done) < 40
    summary = json.loads(next((out / ".runs").glob("*.json")).read_text())
    assert summary["stop_reason"] == "interrupted"
    assert sum(summary["rows"].values()) == len(done)  # everything finished was flushed
    result = pipeline("run", str(config), "--quiet")
    assert result.returncode == 0
    counts = Counter(r["image_path"] for r in read_rows(out))
    assert len(counts) == 40 and set(counts.values()) == {1}


def test_serve_local_prints_its_url_first(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-local", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line
        url = line[line.index("http://") :].split()[0]
        with urllib.request.urlopen(f"{url}/local/stats", timeout=10) as response:
            assert response.status == 200
            json.loads(response.read())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def test_serve_local_workers_share_the_port_and_stop_together() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-local", "--port", "0", "--workers", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = proc.stdout.readline()
        url = line[line.index("http://") :].split()[0]
        workers = _children(proc.pid)
        assert len(workers) == 2
        for _ in range(12):
            with urllib.request.urlopen(f"{url}/local/stats", timeout=10) as response:
                assert response.status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    refused = pipeline("serve-local", "--workers", "2", "--rpm", "10", check=False)
    assert refused.returncode == 2 and "--workers" in refused.stderr


def test_two_runs_on_one_output_the_second_is_refused(tmp_path: Path) -> None:
    config, out = _slow_run(tmp_path, 300)  # ~10 s of work: still running when the second starts
    first = _start(config)
    try:
        wait_for(lambda: (out / ".sink.lock").exists())
        second = pipeline("run", str(config), "--quiet", check=False)
        assert second.returncode == 2
        assert "another run" in second.stderr or "busy" in second.stderr.lower()
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=60)


def test_a_second_ctrl_c_abandons_in_flight_calls_and_loses_nothing(tmp_path: Path) -> None:
    config, out = _slow_run(tmp_path, 40)
    proc = _start(config)
    wait_for(lambda: len(_parts(out)) >= 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    done = Counter(r["image_path"] for r in read_rows(out))
    assert set(done.values()) == {1}
    result = pipeline("run", str(config), "--quiet")
    assert result.returncode == 0
    counts = Counter(r["image_path"] for r in read_rows(out))
    assert len(counts) == 40 and set(counts.values()) == {1}


def test_help_imports_nothing_heavy() -> None:
    """`pipeline --help` (and an argument error) answer in ~0.15 s of CPU: pyarrow, numpy,
    Pillow, aiohttp and jsonschema (~0.5 s together) are imported by the commands that use
    them, not by the command line's parser."""
    heavy = ("pyarrow", "numpy", "PIL", "aiohttp", "jsonschema")
    code = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_run_does_not_import_pandas_and_pandas_still_works_after(tmp_path: Path) -> None:
    """pyarrow's first `pa.array` imports pandas (0.3-0.45 s of CPU) to ask whether a list is a
    pandas object; `pipeline run` tells it no. Its rows are written all the same, and pyarrow's
    pandas conversions in the same process import pandas and work."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        draw_shapes(96, 96, seed=900 + i, count=2)[0].save(images / f"p{i}.png")
    config = write_config(tmp_path / "c.toml", images, tmp_path / "out")
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"assert main(['run', {str(config)!r}, '--quiet']) == 0\n"
        "print('pandas' in sys.modules)\n"
        "from pipeline.output.parts import current_rows\n"
        f"frame = current_rows({str(tmp_path / 'out')!r}).to_pandas()\n"
        "print(type(frame).__module__.split('.')[0], len(frame))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "pandas", "3"]


def test_an_in_process_run_leaves_the_callers_garbage_collector_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline run` freezes the collector's view and collects less while it runs
    (cli._collecting_less); a caller of main() — a notebook, this test — gets its own back."""
    monkeypatch.chdir(REPO)
    before = gc.get_threshold()
    code = main(["run", "configs/demo.toml", "--output", str(tmp_path / "demo"), "--quiet"])
    assert code == 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)
    assert len(read_rows(tmp_path / "demo")) == len(
        json.loads((REPO / "data" / "samples-truth.json").read_text())
    )


def test_a_callers_frozen_objects_stay_frozen_after_a_run() -> None:
    """A caller that froze its own objects (`gc.freeze`, as a forking server does) still has
    them frozen after `pipeline run` in process: `gc.unfreeze` thawed every frozen object."""
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _collecting_less():
            pass
        # (a frozen object freed meanwhile leaves the count: not all of them are still there)
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()
