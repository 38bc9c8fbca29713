"""What every benchmark runs in: its context, the local server, measured child processes, the
pipeline run as users run it, the results record and the printed tables.

- `Benchmark` and `Ctx`: a benchmark's sizes (`--quick` and full) and where it works;
  `run_benchmark` gives it fresh temporary directories, times it and records its figures.
- `Server`: `python -m pipeline serve-local --port 0` in its own process.
- `run_measured`: a child process's wall time, CPU (wait4) and peak RSS (VmHWM from /proc).
- `write_config`, `run_pipeline`, `run_script`, `read_rows`: `python -m pipeline run` on a
  generated TOML config, a baseline script, the Parquet rows either wrote.
- `record` (one JSON line in docs/bench-results.jsonl) and `table` (what is printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "docs" / "bench-results.jsonl"
PLOTS = ROOT / "docs" / "bench"
MODEL = "gemini-2.5-flash"
LOCAL_KEY = "bench-local-key"  # the local server takes any key
SEED = 20261123

S = TypeVar("S")


@dataclass(frozen=True)
class Ctx(Generic[S]):
    """Where a benchmark works: outputs and logs on disk, images on tmpfs when there is one
    (creating a small file costs ~0.8 ms on this VM's disk and ~12 µs on tmpfs; reading it back
    comes from memory either way)."""

    sizes: S
    work: Path
    images: Path
    quick: bool

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def output(self, name: str) -> Path:
        """Where the pipeline run NAME (configured by `write_config(ctx, NAME, ...)`) writes."""
        return self.work / f"out-{name}"

    def plot(self, name: str) -> Path:
        """docs/bench/NAME.png, or NAME-quick.png for a `--quick` run (never over the full one)."""
        return PLOTS / f"{name}{'-quick' if self.quick else ''}.png"


@dataclass(frozen=True)
class Benchmark(Generic[S]):
    """One subcommand of scripts/bench.py: `run(ctx)` measures at `ctx.sizes`, prints its table
    and returns its figures (JSON-able, recorded as they are); `quick` and `full` are its sizes
    (`--quick` shrinks them so that `all --quick` fits in 10 minutes on a 2-core machine);
    `smoke`, the tiny size `--smoke` runs (every path once, seconds, no figure worth keeping)."""

    run: Callable[[Ctx[S]], dict[str, Any]]
    quick: S
    full: S
    smoke: S | None = None


def run_benchmark(
    name: str,
    benchmark: Benchmark[Any],
    *,
    quick: bool,
    keep: bool,
    save: bool,
    smoke: bool = False,
) -> None:
    """Run one benchmark in fresh temporary directories; record its figures when `save`.
    `smoke`: at its smoke size, never recorded (a check that it still runs, not a measurement)."""
    if smoke and benchmark.smoke is None:
        raise SystemExit(f"{name} has no --smoke size")
    shm = Path("/dev/shm")
    fast = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix=f"gvp-bench-{name}-"))
    images = Path(tempfile.mkdtemp(prefix=f"gvp-bench-{name}-images-", dir=fast))
    sizes = benchmark.smoke if smoke else benchmark.quick if quick else benchmark.full
    t0 = time.perf_counter()
    try:
        figures = benchmark.run(Ctx(sizes, work, images, quick or smoke))
        figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
        if save and not smoke:
            record(name, quick, figures)
    finally:
        if keep:
            print(f"kept {work} and {images}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)
    print(f"[{name}: {time.perf_counter() - t0:.0f} s]")


# ------------------------------------------------------------------------------- record
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for name in ("aiohttp", "pyarrow", "numpy", "pillow", "google-genai", "supervision"):
        with contextlib.suppress(Exception):
            versions[name] = version(name)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def record(command: str, quick: bool, figures: dict[str, Any]) -> None:
    """Append one JSON line to docs/bench-results.jsonl."""
    entry = {
        "command": command,
        "quick": quick,
        "argv": sys.argv[1:],
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_info(),
        "figures": figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    print(f"\nappended a record to {RESULTS.relative_to(ROOT)}")


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


# -------------------------------------------------------------------------------- server
class Server:
    """`python -m pipeline serve-local` in its own process; the URL is its first stdout line."""

    def __init__(self, logs: Path, **options: Any) -> None:
        self.logs = logs
        self.options = options
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._err: TextIO | None = None

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "pipeline", "serve-local", "--port", "0"]
        for name, value in self.options.items():
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        self.logs.mkdir(parents=True, exist_ok=True)
        self._err = open(self.logs / "server.stderr", "a")  # closed in __exit__
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        found = [w for w in line.split() if w.startswith("http://")]
        if not found:
            self.__exit__(None, None, None)
            tail = (self.logs / "server.stderr").read_text()[-2000:]
            raise RuntimeError(f"serve-local printed {line!r}, not a URL; stderr:\n{tail}")
        self.url = found[0].rstrip("/")
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        """Keep reading stdout so a chatty server never blocks on a full pipe."""
        assert self.proc and self.proc.stdout
        with open(self.logs / "server.stdout", "a") as out:
            for line in self.proc.stdout:
                out.write(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err:
            self._err.close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/local/stats", timeout=10) as response:
            return json.loads(response.read())

    def generate_counts(self) -> Counter[str]:
        """generateContent requests by HTTP status, from the server's /local/stats counters."""
        counts: Counter[str] = Counter()
        for path, statuses in self.stats().get("requests", {}).items():
            if ":generateContent" in path or path.endswith("generateContent"):
                for status, n in statuses.items():
                    counts[str(status)] += int(n)
        return counts

    def cpu_seconds(self) -> float:
        """User + system CPU of the server so far, its worker processes (`--workers`) included."""
        assert self.proc
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
        return sum(_proc_cpu(pid) for pid in pids)


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- process
@dataclass
class Proc:
    """One measured child process: wall time, exit code, CPU (wait4) and memory (/proc)."""

    wall: float
    returncode: int
    peak_rss_mb: float  # the largest VmHWM seen (peak RSS since exec), summed over the tree
    cpu_seconds: float
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (s, MB), tree
    stdout: str = ""
    stderr: str = ""


def run_measured(
    cmd: Sequence[str],
    logs: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    on_start: Callable[[float], None] | None = None,
) -> Proc:
    """Run `cmd`; CPU from wait4, peak RSS from VmHWM polled every 20 ms until it exits.

    Not ru_maxrss: Linux carries the parent's peak RSS into a child's across fork and exec, so a
    benchmark process holding a big index would inflate every child's figure.
    """
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    full_env = {**os.environ, "GEMINI_API_KEY": LOCAL_KEY, **(env or {})}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=full_env)
        if on_start:
            on_start(started)
        ended: dict[str, Any] = {}

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            ended.update(t=time.perf_counter(), status=status, usage=usage)

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        samples, peak, polls = [], 0.0, 0
        while reaper.is_alive():
            rss, hwm = _tree_memory_mb(proc.pid)
            peak = max(peak, hwm)
            if rss and polls % 12 == 0:
                samples.append((time.perf_counter() - started, rss))
            polls += 1
            reaper.join(0.02)
        proc.returncode = os.waitstatus_to_exitcode(ended["status"])
    usage = ended["usage"]
    return Proc(
        wall=ended["t"] - started,
        returncode=proc.returncode,
        peak_rss_mb=peak,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        rss_samples=samples,
        stdout=out_path.read_text(),
        stderr=err_path.read_text(),
    )


def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process and its descendants, in MB (zeros once it is gone)."""
    rss_kb, hwm_kb, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm_kb += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return rss_kb / 1024, hwm_kb / 1024


# ------------------------------------------------------------------------------ pipeline
def write_config(
    ctx: Ctx[Any],
    name: str,
    base_url: str,
    *,
    inputs: Sequence[Path],
    concurrency: int,
    rpm: int | None = None,
    tpm: int | None = None,
    kind: str = "segment",
) -> Path:
    """WORK/NAME.toml: task `kind` over `inputs` against the server at `base_url`, with these
    limits, writing into `ctx.output(NAME)`."""
    path, output = ctx.work / f"{name}.toml", ctx.output(name)
    limits = [f"concurrency = {concurrency}"]
    if rpm:
        limits.append(f"rpm = {rpm}")
    if tpm:
        limits.append(f"tpm = {tpm}")
    paths = ", ".join(json.dumps(str(p)) for p in inputs)
    path.write_text(
        "\n".join(
            [
                "# generated by scripts/bench.py",
                "[api]",
                f"base_url = {json.dumps(base_url)}",
                f"model = {json.dumps(MODEL)}",
                "[limits]",
                *limits,
                "[input]",
                f"paths = [{paths}]",
                "[task]",
                f"kind = {json.dumps(kind)}",
                "[output]",
                f"dir = {json.dumps(str(output))}",
                "",
            ]
        )
    )
    return path


def run_pipeline(
    ctx: Ctx[Any], config: Path, *extra: str, **kwargs: Any
) -> tuple[Proc, dict[str, Any]]:
    """`python -m pipeline run CONFIG --base-url URL --quiet` (URL: the config's), measured, its
    output in LOGS/NAME.stdout and .stderr (NAME: the config's); returns the run's JSON summary."""
    settings = tomllib.loads(config.read_text())
    url, output, name = settings["api"]["base_url"], Path(settings["output"]["dir"]), config.stem
    cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--base-url", url, "--quiet"]
    proc = run_measured([*cmd, *extra], ctx.logs, name, **kwargs)
    summaries = sorted((output / ".runs").glob("*.json")) if (output / ".runs").is_dir() else []
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    if proc.returncode not in (0, 1) or not summary:
        raise RuntimeError(
            f"pipeline run {name} exited {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
        )
    return proc, summary


def read_rows(output: Path, columns: Sequence[str]) -> pa.Table:
    parts = sorted((output / "data").glob("*.parquet"))
    if not parts:
        raise RuntimeError(f"no Parquet parts under {output}")
    return pa.concat_tables(pq.read_table(p, columns=list(columns)) for p in parts)


def completed_seconds(rows: pa.Table) -> np.ndarray:
    """The rows' `completed_at` as Unix seconds (a float numpy array, in row order)."""
    return rows.column("completed_at").cast(pa.int64()).to_numpy() / 1e6


def run_script(
    script: str, url: str, images: Path, output: Path, logs: Path, *extra: str
) -> tuple[Proc, dict[str, Any]]:
    """scripts/SCRIPT (a baseline) on a folder; returns the JSON summary it prints last."""
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--base-url", url]
    cmd += ["--input", str(images), "--output", str(output), *extra]
    proc = run_measured(cmd, logs, script.removesuffix(".py"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script} exited {proc.returncode}; stderr:\n{proc.stderr[-3000:]}")
    return proc, json.loads(lines[-1])
