"""Benchmarks of the pipeline, side by side with what users would write instead.

    python scripts/bench.py {throughput,latency,rate,memory,resume,profile,all} [--quick]

Every subcommand starts its own local Gemini-compatible server in a separate process
(`python -m pipeline serve-local --port 0 ...`), generates its own seeded images under a temporary
directory (never committed), runs the pipeline the way users run it (`python -m pipeline run
CONFIG --base-url URL` in a subprocess, with a generated TOML config), prints a table and appends
one JSON record (command, machine, figures, git commit) to docs/bench-results.jsonl.
`--quick` shrinks every size so that `all --quick` fits in 10 minutes on a 2-core machine.
docs/benchmarks.md explains every figure and what exactly is measured.
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from make_samples import draw_scene  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

RESULTS = ROOT / "docs" / "bench-results.jsonl"
PLOTS = ROOT / "docs" / "bench"
MODEL = "gemini-2.5-flash"
LOCAL_KEY = "bench-local-key"  # the local server takes any key
SEED = 20261123
MB = 1024 * 1024
SERVER_WORKERS = 2

TARGETS = {
    "throughput_vs_sdk": 2.0,  # x the SDK script's images/s
    "throughput_images_per_s": 300.0,
    "latency_fraction_of_ideal": 0.90,
    "rate_fraction_of_limit": 0.97,
    "rate_429_fraction": 0.005,
    "memory_peak_mb_at_300k": 300.0,
    "resume_first_request_s": 10.0,
}


@dataclass(frozen=True)
class Sizes:
    throughput_images: int
    seed_images: int  # the sequential seed loop runs on the first N of the same images
    concurrency: int
    latency_concurrencies: tuple[int, ...]
    latency_rounds: int  # images per run = concurrency x rounds
    rate_phases: tuple[tuple[str, float], ...]  # (which limit binds, seconds of requests)
    rate_rpm: int
    memory_counts: tuple[int, ...]
    resume_rows: int
    profile_images: int


QUICK = Sizes(
    throughput_images=1500,
    seed_images=300,
    concurrency=32,
    latency_concurrencies=(8, 32, 128),
    latency_rounds=8,
    rate_phases=(("rpm", 120.0),),
    rate_rpm=600,
    memory_counts=(10_000, 30_000),
    resume_rows=1_000_000,
    profile_images=600,
)
FULL = Sizes(
    throughput_images=6000,
    seed_images=1000,
    concurrency=32,
    latency_concurrencies=(8, 32, 128),
    latency_rounds=25,
    rate_phases=(("rpm", 240.0), ("tpm", 240.0)),
    rate_rpm=1200,
    memory_counts=(10_000, 100_000, 300_000),
    resume_rows=1_000_000,
    profile_images=3000,
)


@dataclass(frozen=True)
class Ctx:
    """Where a subcommand works: outputs and logs on disk, images on tmpfs when there is one
    (creating a small file costs ~0.8 ms on this VM's disk and ~12 µs on tmpfs; reading it back
    comes from memory either way)."""

    sizes: Sizes
    work: Path
    images: Path
    quick: bool


# ------------------------------------------------------------------------------- machine
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
            from importlib.metadata import version

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


# -------------------------------------------------------------------------------- images
def _scene_chunk(args: tuple[str, int, int, int]) -> int:
    """Write 384-px flat-shape scenes [start, stop) (a process-pool job)."""
    folder, start, stop, side = args
    objects = 0
    for i in range(start, stop):
        image, shapes = draw_scene(random.Random(SEED * 1_000_003 + i), side, side)
        image.save(Path(folder) / f"scene-{i:06d}.png", "PNG")
        objects += len(shapes)
    return objects


def make_scenes(folder: Path, count: int, side: int = 384) -> int:
    """`count` PNG scenes of 2-4 shapes each (seeded); returns the number of shapes drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    return _in_pool(_scene_chunk, [(str(folder), a, b, side) for a, b in _chunks(count, 500)])


def _tiny_chunk(args: tuple[str, int, int]) -> int:
    """Write tiny 32x32 images [start, stop): one shape each, 1000 per folder."""
    folder, start, stop = args
    for i in range(start, stop):
        rng = random.Random(SEED * 7 + i)
        background = rng.choice([(255, 255, 255), (30, 30, 30), (245, 240, 230)])
        image = Image.new("RGB", (32, 32), background)
        w, h = rng.randint(8, 16), rng.randint(8, 16)
        x, y = rng.randint(2, 30 - w), rng.randint(2, 30 - h)
        colour = rng.choice([(220, 40, 40), (40, 170, 70), (40, 80, 220), (235, 200, 40)])
        ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
        info = PngInfo()
        info.add_text("n", str(i))  # distinct bytes for every image: no dedupe shortcut
        sub = Path(folder) / f"d{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"tiny-{i:07d}.png", "PNG", pnginfo=info)
    return stop - start


def make_tiny(folder: Path, count: int) -> list[Path]:
    """`count` tiny PNGs in sub-folders of 1000; returns the sub-folders in walk order."""
    folder.mkdir(parents=True, exist_ok=True)
    _in_pool(_tiny_chunk, [(str(folder), a, b) for a, b in _chunks(count, 1000)])
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _chunks(count: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, count)) for a in range(0, count, size)]


def _in_pool(job: Callable[[Any], int], jobs: list[Any]) -> int:
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return sum(pool.map(job, jobs))


# -------------------------------------------------------------------------------- server
class Server:
    """`python -m pipeline serve-local` in its own process; the URL is its first stdout line."""

    def __init__(self, logs: Path, **options: Any) -> None:
        self.logs = logs
        self.options = options
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

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
        self._err.close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/local/stats", timeout=10) as response:
            return json.loads(response.read())

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


def generate_counts(stats: dict[str, Any]) -> Counter[str]:
    """generateContent requests by HTTP status, from the server's /local/stats counters."""
    counts: Counter[str] = Counter()
    by_path = stats.get("requests", {})
    for path, statuses in by_path.items():
        if ":generateContent" in path or path.endswith("generateContent"):
            for status, n in statuses.items():
                counts[str(status)] += int(n)
    return counts


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


def write_config(
    path: Path,
    *,
    base_url: str,
    inputs: Sequence[Path],
    output: Path,
    concurrency: int,
    rpm: int | None = None,
    tpm: int | None = None,
    kind: str = "segment",
) -> Path:
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
    config: Path, url: str, logs: Path, name: str, *extra: str, **kwargs: Any
) -> tuple[Proc, dict[str, Any]]:
    """`python -m pipeline run CONFIG --base-url URL --quiet`; returns the run's JSON summary."""
    cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--base-url", url, "--quiet"]
    proc = run_measured([*cmd, *extra], logs, name, **kwargs)
    output = Path(_config_output(config))
    summaries = sorted((output / "runs").glob("*.json")) if (output / "runs").is_dir() else []
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    if proc.returncode not in (0, 1) or not summary:
        raise RuntimeError(
            f"pipeline run {name} exited {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
        )
    return proc, summary


def _config_output(config: Path) -> str:
    import tomllib

    return tomllib.loads(config.read_text())["output"]["dir"]


def read_rows(output: Path, columns: Sequence[str]) -> pa.Table:
    parts = sorted(output.rglob("*.parquet"))
    if not parts:
        raise RuntimeError(f"no Parquet parts under {output}")
    return pa.concat_tables(pq.read_table(p, columns=list(columns)) for p in parts)


def run_script(
    script: str, url: str, images: Path, output: Path, logs: Path, *extra: str
) -> tuple[Proc, dict[str, Any]]:
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--base-url", url]
    cmd += ["--input", str(images), "--output", str(output), *extra]
    proc = run_measured(cmd, logs, script.removesuffix(".py"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script} exited {proc.returncode}; stderr:\n{proc.stderr[-3000:]}")
    return proc, json.loads(lines[-1])


# --------------------------------------------------------------------------- subcommands
Measured = tuple[Proc, int, int, int, float]  # process, ok, errors, objects, in-run seconds


def cmd_throughput(ctx: Ctx) -> dict[str, Any]:
    """Segment task, zero-latency server: pipeline vs SDK script vs the seed loop.

    Twice: against the server answering from pixels (it analyses every image and renders its
    masks, ~3 ms of CPU a request on this machine's other core), then against the same server
    replaying those very answers by image sha256 (`--replay`), which leaves the two cores to the
    clients, as the real service would. Each contender gets a fresh server.
    """
    sizes, work = ctx.sizes, ctx.work
    n, conc = sizes.throughput_images, sizes.concurrency
    images = ctx.images / "scenes"
    t0 = time.perf_counter()
    shapes = make_scenes(images, n)
    print(f"made {n} 384-px scenes ({shapes} shapes) in {time.perf_counter() - t0:.1f} s")
    results: dict[str, dict[str, dict[str, Any]]] = {"analysing": {}, "replay": {}}
    replay: dict[str, Any] = {}

    def measure(mode: str, name: str, count: int, go: Callable[[Server], Measured]) -> None:
        # Answering from pixels costs the server ~3 ms of CPU a request: two worker processes
        # let it use both cores instead of capping every contender at one core's worth.
        workers = SERVER_WORKERS if mode == "analysing" else None
        logs = work / "logs" / f"{mode}-{name}"
        with Server(logs, seed=SEED, workers=workers, **replay) as server:
            cpu0 = server.cpu_seconds()
            proc, ok, errors, objects, run_s = go(server)
            server_cpu = server.cpu_seconds() - cpu0
            replayed = server.stats().get("replayed", 0)
        results[mode][name] = {
            "images": count,
            "ok": ok,
            "errors": errors,
            "objects": objects,
            "replayed": replayed,
            "wall_s": round(proc.wall, 3),
            "images_per_s": round(count / proc.wall, 1),
            "in_run_s": round(run_s, 3),
            "in_run_images_per_s": round(count / run_s, 1),
            "client_cpu_ms_per_image": round(proc.cpu_seconds / count * 1000, 3),
            "server_cpu_ms_per_image": round(server_cpu / count * 1000, 3),
            "server_cpu_utilisation": round(server_cpu / proc.wall, 3),
            "client_cpu_utilisation": round(proc.cpu_seconds / proc.wall, 3),
            "peak_rss_mb": round(proc.peak_rss_mb, 1),
        }

    def pipeline(mode: str) -> Callable[[Server], Measured]:
        def go(server: Server) -> Measured:
            out = work / f"out-pipeline-{mode}"
            config = write_config(
                work / f"throughput-{mode}.toml",
                base_url=server.url,
                inputs=[images],
                output=out,
                concurrency=conc,
            )
            proc, summary = run_pipeline(config, server.url, work / "logs", f"pipeline-{mode}")
            rows = read_rows(out, ["status", "objects"])
            objects = sum(len(o) for o in rows.column("objects").to_pylist() if o)
            ok = summary["rows"].get("ok", 0)
            run_s = (
                datetime.fromisoformat(summary["finished_at"])
                - datetime.fromisoformat(summary["started_at"])
            ).total_seconds()
            return proc, ok, rows.num_rows - ok, objects, run_s

        return go

    def script(mode: str, name: str, *extra: str) -> Callable[[Server], Measured]:
        def go(server: Server) -> Measured:
            out = work / f"{name}-{mode}.parquet"
            logs = work / "logs" / mode
            proc, s = run_script(f"baseline_{name}.py", server.url, images, out, logs, *extra)
            return proc, s["ok"], s["errors"], s["objects"], s["seconds"]

        return go

    for mode in ("analysing", "replay"):
        if mode == "replay":
            replay["replay"] = _replay_file(work, images, sizes.seed_images)
        measure(mode, "pipeline", n, pipeline(mode))
        measure(mode, "sdk", n, script(mode, "sdk", "--concurrency", str(conc)))
        measure(
            mode, "seed", sizes.seed_images, script(mode, "seed", "--limit", str(sizes.seed_images))
        )
    figures: dict[str, Any] = {
        "images": n,
        "image_side": 384,
        "shapes_drawn": shapes,
        "concurrency": conc,
        "results": results,
        "target_ratio_vs_sdk": TARGETS["throughput_vs_sdk"],
        "target_images_per_s": TARGETS["throughput_images_per_s"],
    }
    for mode, by_name in results.items():
        p, s, q = (by_name[k]["images_per_s"] for k in ("pipeline", "sdk", "seed"))
        figures[f"ratio_vs_sdk_{mode}"] = round(p / s, 2)
        figures[f"ratio_vs_seed_{mode}"] = round(p / q, 2)
        p, s = (by_name[k]["in_run_images_per_s"] for k in ("pipeline", "sdk"))
        figures[f"in_run_ratio_vs_sdk_{mode}"] = round(p / s, 2)
    table(
        f"throughput: segment, {n} x 384-px PNG scenes (seed loop: first {sizes.seed_images}), "
        f"zero-latency local server, concurrency {conc}; wall time of the whole process",
        [
            "server",
            "contender",
            "images",
            "ok",
            "objects",
            "wall s",
            "images/s",
            "in-run img/s",
            "client CPU ms/img",
            "server CPU ms/img",
            "server CPU util",
            "peak RSS MB",
        ],
        [
            [
                mode,
                k,
                r["images"],
                r["ok"],
                r["objects"],
                r["wall_s"],
                r["images_per_s"],
                r["in_run_images_per_s"],
                r["client_cpu_ms_per_image"],
                r["server_cpu_ms_per_image"],
                r["server_cpu_utilisation"],
                r["peak_rss_mb"],
            ]
            for mode, by_name in results.items()
            for k, r in by_name.items()
        ],
    )
    for mode in results:
        print(
            f"{mode} server: pipeline / SDK script = {figures[f'ratio_vs_sdk_{mode}']}x "
            f"(target >= 2x), {figures[f'in_run_ratio_vs_sdk_{mode}']}x in-run; "
            f"pipeline / seed loop = {figures[f'ratio_vs_seed_{mode}']}x; "
            f"pipeline {results[mode]['pipeline']['images_per_s']} images/s (target >= 300)"
        )
    return figures


def _replay_file(work: Path, images: Path, seed_count: int) -> Path:
    """The analysing server's answers, keyed by the sha256 of the bytes each client sends.

    The pipeline and the SDK script send the files as they are; the seed loop sends what the SDK
    makes of a Pillow image (re-encoded PNG), so its first `seed_count` images get their own keys.
    """
    import hashlib

    from google.genai import _transformers

    from pipeline.gemini.client import parse_generate_content

    rows = read_rows(
        work / "out-pipeline-analysing", ["image_path", "image_sha256", "raw_response"]
    )
    path = work / "replay.jsonl"
    with path.open("w") as fh:
        for row in rows.to_pylist():
            text = parse_generate_content(row["raw_response"]).text
            fh.write(json.dumps({"sha256": row["image_sha256"], "text": text}) + "\n")
            if int(row["image_path"].split("-")[1].split(".")[0]) < seed_count:
                image = Image.open(images / row["image_path"])
                image.thumbnail([1024, 1024], Image.Resampling.LANCZOS)
                sent = _transformers.pil_to_blob(image).data
                fh.write(
                    json.dumps({"sha256": hashlib.sha256(sent).hexdigest(), "text": text}) + "\n"
                )
    return path


def cmd_latency(ctx: Ctx) -> dict[str, Any]:
    """Mean 2 s long-tail latency: throughput against concurrency, vs concurrency / latency."""
    sizes, work = ctx.sizes, ctx.work
    mean_s = 2.0
    biggest = max(sizes.latency_concurrencies) * sizes.latency_rounds
    images = ctx.images / "tiny"
    folders = make_tiny(images, biggest)
    runs = []
    with Server(work / "logs" / "latency", seed=SEED, latency_ms=int(mean_s * 1000)) as server:
        for conc in sizes.latency_concurrencies:
            n = conc * sizes.latency_rounds
            out = work / f"out-latency-{conc}"
            config = write_config(
                work / f"latency-{conc}.toml",
                base_url=server.url,
                inputs=folders,
                output=out,
                concurrency=conc,
            )
            proc, summary = run_pipeline(
                config, server.url, work / "logs", f"latency-{conc}", "--limit", str(n)
            )
            rows = read_rows(out, ["status", "completed_at", "latency_ms"])
            done = np.sort(rows.column("completed_at").cast(pa.int64()).to_numpy()) / 1e6
            lat = rows.column("latency_ms").to_numpy(zero_copy_only=False) / 1000
            lo, hi = int(0.1 * len(done)), int(0.9 * len(done))
            steady = (hi - lo) / (done[hi] - done[lo])
            realised = float(np.mean(lat))
            # Requests in flight, averaged over the same window (Little's law, low noise):
            # each row was in flight from completed_at - latency to completed_at.
            ends = rows.column("completed_at").cast(pa.int64()).to_numpy() / 1e6
            overlap = np.clip(
                np.minimum(ends, done[hi]) - np.maximum(ends - lat, done[lo]), 0, None
            )
            in_flight = float(overlap.sum() / (done[hi] - done[lo]))
            runs.append(
                {
                    "concurrency": conc,
                    "images": n,
                    "ok": summary["rows"].get("ok", 0),
                    "wall_s": round(proc.wall, 2),
                    "end_to_end_images_per_s": round(n / proc.wall, 2),
                    "steady_images_per_s": round(steady, 2),
                    "mean_latency_s": round(realised, 3),
                    "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
                    "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
                    "max_latency_s": round(float(np.max(lat)), 3),
                    "ideal_nominal": round(conc / mean_s, 2),
                    "ideal_realised": round(conc / realised, 2),
                    "fraction_of_ideal_nominal": round(steady / (conc / mean_s), 3),
                    "fraction_of_ideal_realised": round(steady / (conc / realised), 3),
                    "mean_in_flight": round(in_flight, 2),
                    "in_flight_fraction": round(in_flight / conc, 3),
                }
            )
    figures = {
        "server_mean_latency_s": mean_s,
        "rounds": sizes.latency_rounds,
        "runs": runs,
        "target_fraction": TARGETS["latency_fraction_of_ideal"],
    }
    table(
        f"latency: server latency mean {mean_s:g} s (long tail), tiny images, "
        f"{sizes.latency_rounds} x concurrency images per run; steady = completions between "
        "the 10th and 90th percentile",
        [
            "concurrency",
            "images",
            "wall s",
            "end-to-end img/s",
            "steady img/s",
            "ideal c/2s",
            "fraction",
            "mean lat s",
            "p99 lat s",
            "ideal c/mean",
            "fraction",
            "in flight",
            "of c",
        ],
        [
            [
                r["concurrency"],
                r["images"],
                r["wall_s"],
                r["end_to_end_images_per_s"],
                r["steady_images_per_s"],
                r["ideal_nominal"],
                r["fraction_of_ideal_nominal"],
                r["mean_latency_s"],
                r["p99_latency_s"],
                r["ideal_realised"],
                r["fraction_of_ideal_realised"],
                r["mean_in_flight"],
                r["in_flight_fraction"],
            ]
            for r in runs
        ],
    )
    return figures


def _probe_prompt_tokens(work: Path, sample: Path) -> int:
    """Billed input tokens of one request as the pipeline builds it (asked of a probe server)."""
    from dataclasses import replace

    from pipeline.config import load_config
    from pipeline.gemini.client import build_generate_content_body
    from pipeline.gemini.types import ImagePart
    from pipeline.tasks import get_task

    with Server(work / "logs" / "probe", seed=SEED) as server:
        config = load_config(
            write_config(
                work / "probe.toml",
                base_url=server.url,
                inputs=[sample.parent],
                output=work / "out-probe",
                concurrency=1,
            )
        )
        request = get_task("segment").request(config.task)
        part = ImagePart("image/png", data=sample.read_bytes())
        body = build_generate_content_body(replace(request, images=(part,)))
        http = urllib.request.Request(
            f"{server.url}/v1beta/models/{MODEL}:generateContent",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "x-goog-api-key": LOCAL_KEY},
        )
        with urllib.request.urlopen(http, timeout=30) as response:
            answer = json.loads(response.read())
    return int(answer["usageMetadata"]["promptTokenCount"])


class StatsPoller:
    """Polls the server's counters; per-second request and 429 series for the plot."""

    def __init__(self, server: Server, every: float = 0.25) -> None:
        self.server, self.every = server, every
        self.samples: list[tuple[float, Counter[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.samples.append((time.time(), generate_counts(self.server.stats())))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)


def cmd_rate(ctx: Ctx) -> dict[str, Any]:
    """RPM and TPM enforced by the server in calendar-minute windows; the pipeline paces."""
    sizes, work, quick = ctx.sizes, ctx.work, ctx.quick
    rpm = sizes.rate_rpm
    total = sum(int(seconds * rpm / 60 * 1.02) + 20 for _, seconds in sizes.rate_phases)
    images = ctx.images / "tiny"
    folders = make_tiny(images, total)
    tokens = _probe_prompt_tokens(work, next(folders[0].iterdir()))
    phases, start_at = [], 0
    for binds, seconds in sizes.rate_phases:
        # The binding limit is the configured one; the other is enforced with room to spare.
        if binds == "rpm":
            limit_rpm, limit_tpm = rpm, int(rpm * tokens * 1.25)
        else:
            limit_rpm, limit_tpm = int(rpm * 1.25), int(rpm * tokens)
        n = int(seconds * rpm / 60)
        phase_images = ctx.images / f"rate-{binds}"
        phase_images.mkdir()
        # This phase's own images: symlink the next n tiny files into one folder.
        for i, path in enumerate(_iter_files(folders, start_at, n)):
            (phase_images / f"{i:06d}.png").symlink_to(path)
        start_at += n
        out = work / f"out-rate-{binds}"
        with Server(work / "logs" / f"rate-{binds}", seed=SEED, rpm=limit_rpm, tpm=limit_tpm) as s:
            config = write_config(
                work / f"rate-{binds}.toml",
                base_url=s.url,
                inputs=[phase_images],
                output=out,
                concurrency=64,
                rpm=limit_rpm,
                tpm=limit_tpm,
            )
            with StatsPoller(s) as poller:
                proc, summary = run_pipeline(config, s.url, work / "logs", f"rate-{binds}")
        phases.append(
            _rate_figures(binds, limit_rpm, limit_tpm, tokens, out, proc, summary, poller, quick)
        )
    figures = {"prompt_tokens_per_request": tokens, "phases": phases}
    figures["targets"] = {
        "fraction": TARGETS["rate_fraction_of_limit"],
        "max_429_fraction": TARGETS["rate_429_fraction"],
    }
    table(
        "rate: server enforces RPM and TPM in calendar-minute windows; pipeline has the same "
        "limits",
        [
            "binds",
            "rpm",
            "tpm",
            "requests",
            "429s",
            "429 %",
            "span s",
            "RPM achieved",
            "of RPM",
            "TPM achieved",
            "of TPM",
            "full minutes (of binding limit)",
        ],
        [
            [
                p["binds"],
                p["rpm"],
                p["tpm"],
                p["requests"],
                p["throttled"],
                f"{p['throttled_fraction'] * 100:.2f}",
                p["span_s"],
                p["rpm_achieved"],
                p["fraction_of_rpm"],
                p["tpm_achieved"],
                p["fraction_of_tpm"],
                " ".join(f"{m['fraction']:.3f}" for m in p["full_minutes"]) or "-",
            ]
            for p in phases
        ],
    )
    for p in phases:
        print(f"plot: {p['plot']}")
    return figures


def _iter_files(folders: Sequence[Path], skip: int, count: int) -> Iterator[Path]:
    seen = 0
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if seen >= skip + count:
                return
            if seen >= skip:
                yield path
            seen += 1


def _rate_figures(
    binds: str,
    rpm: int,
    tpm: int,
    tokens: int,
    out: Path,
    proc: Proc,
    summary: dict[str, Any],
    poller: StatsPoller,
    quick: bool,
) -> dict[str, Any]:
    rows = read_rows(out, ["status", "completed_at", "prompt_tokens"])
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    when = np.sort(ok.column("completed_at").cast(pa.int64()).to_numpy()) / 1e6
    billed = ok.column("prompt_tokens").to_numpy(zero_copy_only=False).astype(float)
    final = poller.samples[-1][1]
    accepted, throttled = final.get("200", 0), final.get("429", 0)
    requests = sum(final.values())
    span = float(when[-1] - when[0])
    per_minute = (len(when) - 1) / span * 60
    tokens_per_minute = float(np.nansum(billed)) * (len(when) - 1) / len(when) / span * 60
    # Calendar minutes wholly inside the run, counted as the service counts them.
    minute = (when // 60).astype(np.int64)
    full = []
    for m in range(int(minute[0]) + 1, int(minute[-1])):
        inside = minute == m
        n, t = int(inside.sum()), float(np.nansum(billed[inside]))
        binding = n / rpm if binds == "rpm" else t / tpm
        full.append({"minute_utc": m * 60, "requests": n, "tokens": t, "fraction": binding})
    suffix = "-quick" if quick else ""
    plot = PLOTS / f"rate-{binds}{suffix}.png"
    _plot_rate(plot, binds, rpm, tpm, tokens, when, poller)
    return {
        "binds": binds,
        "rpm": rpm,
        "tpm": tpm,
        "rows_ok": ok.num_rows,
        "requests": requests,
        "accepted": accepted,
        "throttled": throttled,
        "throttled_fraction": round(throttled / max(requests, 1), 5),
        "pipeline_throttled": summary.get("throttled"),
        "span_s": round(span, 1),
        "rpm_achieved": round(per_minute, 1),
        "fraction_of_rpm": round(per_minute / rpm, 4),
        "tpm_achieved": round(tokens_per_minute),
        "fraction_of_tpm": round(tokens_per_minute / tpm, 4),
        "full_minutes": full,
        "wall_s": round(proc.wall, 1),
        "plot": str(plot.relative_to(ROOT)),
    }


def cmd_memory(ctx: Ctx) -> dict[str, Any]:
    """Peak RSS of `pipeline run` over growing folders of tiny images."""
    sizes, work, quick = ctx.sizes, ctx.work, ctx.quick
    images = ctx.images / "tiny"
    t0 = time.perf_counter()
    folders = make_tiny(images, max(sizes.memory_counts))
    print(f"made {max(sizes.memory_counts)} tiny images in {time.perf_counter() - t0:.1f} s")
    runs = []
    series = []
    with Server(work / "logs" / "memory", seed=SEED) as server:
        for count in sizes.memory_counts:
            out = work / f"out-memory-{count}"
            config = write_config(
                work / f"memory-{count}.toml",
                base_url=server.url,
                inputs=folders[: math.ceil(count / 1000)],
                output=out,
                concurrency=sizes.concurrency,
            )
            proc, summary = run_pipeline(config, server.url, work / "logs", f"memory-{count}")
            rss = [mb for _, mb in proc.rss_samples]
            runs.append(
                {
                    "images": count,
                    "ok": summary["rows"].get("ok", 0),
                    "wall_s": round(proc.wall, 1),
                    "images_per_s": round(count / proc.wall, 1),
                    "peak_rss_mb": round(proc.peak_rss_mb, 1),
                    "rss_at_10pct_mb": round(rss[len(rss) // 10], 1) if rss else None,
                    "rss_at_90pct_mb": round(rss[len(rss) * 9 // 10], 1) if rss else None,
                }
            )
            series.append((f"{count:,} images", proc.rss_samples))
            shutil.rmtree(out)
    base = runs[0]["peak_rss_mb"]
    for r in runs:
        r["growth_vs_first"] = round(r["peak_rss_mb"] / base, 3)
    plot = PLOTS / ("memory-quick.png" if quick else "memory.png")
    _plot_memory(plot, series)
    figures = {
        "runs": runs,
        "plot": str(plot.relative_to(ROOT)),
        "target_peak_mb_at_300k": TARGETS["memory_peak_mb_at_300k"],
    }
    table(
        "memory: peak RSS of `pipeline run` (VmHWM), 32x32 PNGs, zero-latency server",
        ["images", "ok", "wall s", "img/s", "peak RSS MB", "RSS@10% MB", "RSS@90% MB", "x first"],
        [
            [
                r["images"],
                r["ok"],
                r["wall_s"],
                r["images_per_s"],
                r["peak_rss_mb"],
                r["rss_at_10pct_mb"],
                r["rss_at_90pct_mb"],
                r["growth_vs_first"],
            ]
            for r in runs
        ],
    )
    print(f"plot: {plot.relative_to(ROOT)}")
    return figures


def cmd_resume(ctx: Ctx) -> dict[str, Any]:
    """Time from process start to the first request the server receives, 1M rows committed."""
    sizes, work = ctx.sizes, ctx.work
    from pipeline.config import load_config, settings_hash, with_overrides
    from pipeline.dataset import load_resume_index
    from pipeline.source import walk
    from pipeline.tasks import get_task

    n_rows = sizes.resume_rows
    root = ctx.images / "resume-input"
    make_tiny(root / "new", 8)  # 8 real files
    out = work / "out-resume"
    empty_out = work / "out-resume-control"
    figures: dict[str, Any] = {"committed_rows": n_rows}
    with Server(work / "logs" / "resume", seed=SEED) as server:
        config_path = write_config(
            work / "resume.toml", base_url=server.url, inputs=[root], output=out, concurrency=16
        )
        # The settings hash exactly as `pipeline run` computes it (same loader, same overrides).
        config = with_overrides(load_config(config_path), base_url=server.url)
        suffix = settings_hash(config, get_task(config.task.kind).request(config.task))
        sources = list(walk(config.input.paths))
        committed_real = sources[:3]  # these three must be skipped: proves the rows match
        t0 = time.perf_counter()
        _commit_rows(out, sources[0].root, suffix, n_rows, committed_real)
        figures["write_rows_s"] = round(time.perf_counter() - t0, 1)
        figures["parts"] = len(list(out.glob("*.parquet")))
        t0 = time.perf_counter()
        index = load_resume_index(out, key_suffix=suffix, retry_errors=False)
        figures["index_load_in_process_s"] = round(time.perf_counter() - t0, 2)
        figures["index_done_entries"] = len(index.done)
        del index
        config_control = write_config(
            work / "resume-control.toml",
            base_url=server.url,
            inputs=[root],
            output=empty_out,
            concurrency=16,
        )
        for name, cfg, log in (
            ("control (no rows)", config_control, "resume-control"),
            ("1M rows", config_path, "resume-1m"),
        ):
            first = _FirstRequest(server)
            proc, summary = run_pipeline(cfg, server.url, work / "logs", log, on_start=first.start)
            first.stop()
            figures[name] = {
                "first_request_s": round(first.seconds, 3) if first.seconds else None,
                "wall_s": round(proc.wall, 2),
                "peak_rss_mb": round(proc.peak_rss_mb, 1),
                "seen": summary.get("seen"),
                "skipped": summary.get("skipped"),
                "api_calls": summary.get("api_calls"),
            }
    figures["target_first_request_s"] = TARGETS["resume_first_request_s"]
    table(
        f"resume: {n_rows:,} committed rows (for files that no longer exist, plus 3 real ones); "
        "8 real files in the input, 5 new",
        ["run", "first request s", "wall s", "peak RSS MB", "seen", "skipped", "API calls"],
        [
            [
                name,
                figures[name]["first_request_s"],
                figures[name]["wall_s"],
                figures[name]["peak_rss_mb"],
                figures[name]["seen"],
                figures[name]["skipped"],
                figures[name]["api_calls"],
            ]
            for name in ("control (no rows)", "1M rows")
        ],
    )
    print(
        f"writing the rows took {figures['write_rows_s']} s ({figures['parts']} parts); "
        f"load_resume_index in-process: {figures['index_load_in_process_s']} s for "
        f"{figures['index_done_entries']:,} done entries"
    )
    return figures


class _FirstRequest:
    """Polls the server until its first generateContent arrives after the process starts."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.before = sum(generate_counts(server.stats()).values())
        self.seconds: float | None = None
        self._stop = threading.Event()

    def start(self, started: float) -> None:
        def poll() -> None:
            while not self._stop.is_set():
                if sum(generate_counts(self.server.stats()).values()) > self.before:
                    self.seconds = time.perf_counter() - started
                    return
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._thread.join(5)
        self._stop.set()


def _commit_rows(out: Path, root: str, suffix: str, n: int, real: Sequence[Any]) -> None:
    """`n` committed ok rows as the sink writes them (parts of 5000, zstd, ROW_SCHEMA); all but
    `len(real)` are for files that no longer exist, those are for real files, fingerprint-exact."""
    from pipeline.records import ROW_SCHEMA

    out.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    shas = np.frombuffer(binascii.hexlify(rng.bytes(32 * n)), dtype="S64").astype(str)
    paths = [f"gone/{i // 1000:04d}/img-{i:07d}.png" for i in range(n)]
    sizes = rng.integers(100, 2000, n)
    mtimes = 1_700_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 1_000_000
    for i, src in enumerate(real):  # the first rows describe real files exactly
        paths[i] = src.rel_path
        sizes[i], mtimes[i] = src.size, src.mtime_ns
        shas[i] = _sha256(src.path)
    run_id = "20260101T000000Z-bench0"
    stamp = pa.scalar(datetime(2026, 1, 1, tzinfo=UTC), ROW_SCHEMA.field("completed_at").type)
    per_part = 5000
    for seq, start in enumerate(range(0, n, per_part)):
        stop = min(start + per_part, n)
        m = stop - start
        sha = pa.array(shas[start:stop], pa.string())
        columns = {
            "key": pc.binary_join_element_wise(sha, pa.array([suffix] * m), "."),
            "image_path": pa.array(paths[start:stop], pa.string()),
            "image_root": pa.array([root] * m, pa.string()),
            "image_sha256": sha,
            "file_size": pa.array(sizes[start:stop], pa.int64()),
            "file_mtime_ns": pa.array(mtimes[start:stop], pa.int64()),
            "width": pa.array(np.full(m, 32, np.int32)),
            "height": pa.array(np.full(m, 32, np.int32)),
            "mime_type": pa.array(["image/png"] * m),
            "task": pa.array(["segment"] * m),
            "model": pa.array([MODEL] * m),
            "status": pa.array(["ok"] * m),
            "run_id": pa.array([run_id] * m),
            "completed_at": pa.array([stamp] * m, ROW_SCHEMA.field("completed_at").type),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(m, f.type) for f in ROW_SCHEMA]
        table_ = pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
        pq.write_table(table_, out / f"part-{run_id}-{seq:05d}.parquet", compression="zstd")


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -------------------------------------------------------------------------------- profile
STAGES = ("read", "sniff", "verify", "encode", "HTTP", "parse", "mask", "RLE", "Parquet")
HTTP_LIBS = ("/aiohttp/", "/yarl/", "/multidict/", "/aiohappyeyeballs/", "/propcache/")
HTTP_BUILTINS = ("aiohttp", "_socket", "multidict", "yarl", "_ssl")
LOOP_BUILTINS = ("epoll", "_thread.lock", "_asyncio", "_contextvars", "_queue")
LOOP_FILES = ("/asyncio/", "/concurrent/futures/", "/threading.py", "/queue.py", "/selectors.py")


def cmd_profile(ctx: Ctx) -> dict[str, Any]:
    """Where CPU goes per image: direct timings of each stage's functions (no profiler), an
    HTTP-only client run, and cProfile in every thread (thread CPU clock) of an in-process run."""
    from pipeline.config import load_config, with_overrides
    from pipeline.runner import RunOptions, run

    sizes, work = ctx.sizes, ctx.work
    n = sizes.profile_images
    images = ctx.images / "scenes"
    make_scenes(images, n)
    os.environ["GEMINI_API_KEY"] = LOCAL_KEY
    with Server(work / "logs" / "profile", seed=SEED) as server:

        def configured(name: str) -> Any:
            path = write_config(
                work / f"{name}.toml",
                base_url=server.url,
                inputs=[images],
                output=work / f"out-{name}",
                concurrency=sizes.concurrency,
            )
            return with_overrides(load_config(path), base_url=server.url)

        # 1. The whole client, unprofiled, in-process (no interpreter start-up in the figure).
        config = configured("plain")
        cpu0, server0, wall0 = time.process_time(), server.cpu_seconds(), time.perf_counter()
        run(config, RunOptions(progress=False))
        plain_wall = time.perf_counter() - wall0
        plain_cpu, plain_server = time.process_time() - cpu0, server.cpu_seconds() - server0
        # 2. Each stage's own functions, timed directly over the same images and answers.
        direct = _direct_stages(images, work / "out-plain", config)
        # 3. HTTP only: the client's generate() for the same requests, nothing else.
        http_cpu = _http_only(images, config, server.url, sizes.concurrency)
        # 4. cProfile in every thread.
        profiled_config = configured("profiled")
        wall0 = time.perf_counter()
        stats = _profiled(lambda: run(profiled_config, RunOptions(progress=False)))
        profiled_wall = time.perf_counter() - wall0
    stages, total = _stages(stats)
    top = _top_functions(stats, 25)
    stats.dump_stats(work / "profile.pstats")
    accounted = sum(direct.values())
    direct_rows = [
        [k, round(v, 1), f"{v / (plain_cpu / n * 1e6) * 100:.1f}%"] for k, v in direct.items()
    ]
    rest = plain_cpu / n * 1e6 - accounted
    figures = {
        "images": n,
        "client_cpu_us_per_image": round(plain_cpu / n * 1e6, 1),
        "server_cpu_us_per_image": round(plain_server / n * 1e6, 1),
        "images_per_s_in_process": round(n / plain_wall, 1),
        "direct_stage_us_per_image": {k: round(v, 1) for k, v in direct.items()},
        "not_in_direct_stages_us_per_image": round(rest, 1),
        "http_only_client_cpu_us_per_request": round(http_cpu, 1),
        "profiled": {
            "wall_s": round(profiled_wall, 2),
            "thread_cpu_us_per_image": round(total / n * 1e6, 1),
            "stage_us_per_image": {k: round(v / n * 1e6, 1) for k, v in stages.items()},
            "stage_share": {k: round(v / total, 4) for k, v in stages.items()},
            "top_functions": top,
        },
    }
    table(
        f"profile 1/3: client CPU per image, segment, {n} x 384-px scenes; in-process run "
        f"without profiler: {plain_cpu / n * 1e6:,.0f} µs/image client, "
        f"{plain_server / n * 1e6:,.0f} µs/image server, {n / plain_wall:,.0f} images/s; "
        "each stage's functions timed directly (process CPU) over the same images and answers",
        ["stage (functions)", "µs / image", "of client CPU"],
        [
            *direct_rows,
            [
                "rest: HTTP, event loop, threads, runner, limiter, rows",
                round(rest, 1),
                f"{rest / (plain_cpu / n * 1e6) * 100:.1f}%",
            ],
            [
                "  for comparison, HTTP only: client.generate() of the same requests",
                round(http_cpu, 1),
                f"{http_cpu / (plain_cpu / n * 1e6) * 100:.1f}%",
            ],
        ],
    )
    table(
        "profile 2/3: the same under cProfile (every thread, thread CPU clock; the profiler "
        f"inflates call-heavy Python code): {total / n * 1e6:,.0f} µs/image",
        ["stage", "µs / image", "share"],
        [[k, round(v / n * 1e6, 1), f"{v / total * 100:.1f}%"] for k, v in stages.items()],
    )
    table(
        "profile 3/3: top functions by own CPU (all threads, profiled run)",
        ["function", "calls", "own ms", "cum ms"],
        [[t["function"], t["calls"], t["own_ms"], t["cum_ms"]] for t in top[:20]],
    )
    return figures


def _direct_stages(images: Path, out: Path, config: Any) -> dict[str, float]:
    """µs per image of each stage's functions, called directly (single thread, no profiler)."""
    from dataclasses import replace

    from pipeline import images as imaging
    from pipeline import masks
    from pipeline.gemini.client import build_generate_content_body, parse_generate_content
    from pipeline.gemini.types import ImagePart
    from pipeline.sink import _to_table
    from pipeline.source import walk
    from pipeline.tasks import get_task

    task = get_task(config.task.kind)
    request = task.request(config.task)
    sources = list(walk([images]))
    n = len(sources)
    rows = read_rows(out, [f.name for f in pq.read_schema(next(out.glob("*.parquet")))])
    rows = rows.to_pylist()
    held: dict[str, Any] = {}

    def timed(work: Callable[[], Any]) -> float:
        """The best of three passes: the least disturbed one."""
        best = math.inf
        for _ in range(3):
            started = time.process_time()
            work()
            best = min(best, time.process_time() - started)
        return best / n * 1e6

    out_: dict[str, float] = {}
    light = timed(lambda: [imaging.prepare(s, verify=False) for s in sources])
    out_["read + sha256 + sniff + header (prepare, verify=False)"] = light
    full = timed(lambda: held.update(items=[imaging.prepare(s) for s in sources]))
    out_["verify: full decode (prepare, verify=True, minus the above)"] = full - light
    out_["read again + sha256 again (read_bytes)"] = timed(
        lambda: held.update(data=[imaging.read_bytes(i) for i in held["items"]])
    )
    out_["encode: request body, base64, JSON"] = timed(
        lambda: [
            json.dumps(
                build_generate_content_body(replace(request, images=(ImagePart(i.mime_type, d),))),
                separators=(",", ":"),
            ).encode()
            for i, d in zip(held["items"], held["data"], strict=True)
        ]
    )
    raws = [r["raw_response"] for r in rows]
    out_["decode the response JSON (parse_generate_content)"] = timed(
        lambda: held.update(responses=[parse_generate_content(r) for r in raws])
    )
    answers = list(zip(held["responses"], rows, strict=True))
    whole_parse = timed(
        lambda: [
            task.parse(a.text, a.finish_reason, r["width"], r["height"], config.task)
            for a, r in answers
        ]
    )
    objects = [
        (item, r["width"], r["height"])
        for a, r in answers
        for item in json.loads(a.text)
        if isinstance(item, dict) and isinstance(item.get("mask"), str)
    ]

    def decode_masks() -> None:
        held["inside"] = []
        for item, w, h in objects:
            box = masks.box_to_pixels(item["box_2d"], w, h)
            held["inside"].append((masks.box_mask(masks.decode_png_mask(item["mask"]), box), box))

    mask = timed(decode_masks)
    rle = timed(
        lambda: [
            masks.rle_encode_box(inside, box, w, h)
            for (inside, box), (_, w, h) in zip(held["inside"], objects, strict=True)
        ]
    )
    out_["parse: answer JSON, boxes, labels (task.parse minus mask and RLE)"] = (
        whole_parse - mask - rle
    )
    out_["mask: base64 + PNG decode + resize + threshold"] = mask
    out_["RLE: COCO compressed counts"] = rle
    out_["Parquet: rows -> Arrow -> zstd (no fsync)"] = timed(
        lambda: pq.write_table(_to_table(rows), io.BytesIO(), compression="zstd")
    )
    return out_


def _http_only(images: Path, config: Any, url: str, concurrency: int) -> float:
    """Client CPU µs per request of GeminiClient.generate alone (requests built beforehand)."""
    import asyncio
    from dataclasses import replace

    from pipeline import images as imaging
    from pipeline.gemini import GeminiClient
    from pipeline.gemini.types import ImagePart
    from pipeline.source import walk
    from pipeline.tasks import get_task

    request = get_task(config.task.kind).request(config.task)
    items = [imaging.prepare(s) for s in walk([images])]
    requests = [
        replace(request, images=(ImagePart(i.mime_type, imaging.read_bytes(i)),)) for i in items
    ]

    async def go() -> None:
        async with GeminiClient(LOCAL_KEY, base_url=url, max_connections=concurrency) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(r: Any) -> None:
                async with gate:
                    await client.generate(r)

            await asyncio.gather(*(one(r) for r in requests))

    started = time.process_time()
    asyncio.run(go())
    return (time.process_time() - started) / len(requests) * 1e6


def _profiled(target: Callable[[], Any]) -> pstats.Stats:
    """Run target with one cProfile per thread (threads started meanwhile included)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def new_profiler() -> cProfile.Profile:
        profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
        with lock:
            profilers.append(profiler)
        return profiler

    def bootstrap(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        new_profiler().enable()

    threading.setprofile(bootstrap)
    main = new_profiler()
    main.enable()
    try:
        target()
    finally:
        main.disable()
        threading.setprofile(None)
    stats = pstats.Stats(main)
    for profiler in (p for p in profilers if p is not main):
        with contextlib.suppress(TypeError):  # a thread that never ran profiled code
            stats.add(profiler)
    return stats


def _stages(stats: pstats.Stats) -> tuple[dict[str, float], float]:
    """Seconds of thread CPU per stage; nested stage functions are subtracted, not doubled."""
    table_ = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in table_.values())

    def cum(file_suffix: str, name: str) -> float:
        return sum(v[3] for k, v in table_.items() if k[0].endswith(file_suffix) and k[2] == name)

    def edge(callee_file: str, callee: str, caller_file: str, caller: str) -> float:
        found = 0.0
        for key, value in table_.items():
            if key[0].endswith(callee_file) and key[2] == callee:
                for ckey, cval in value[4].items():
                    if ckey[0].endswith(caller_file) and ckey[2] == caller:
                        found += cval[3]
        return found

    def own(match: Callable[[tuple[str, int, str]], bool]) -> float:
        return sum(v[2] for k, v in table_.items() if match(k))

    sniff = cum("pipeline/images.py", "sniff")
    mask = sum(
        cum("pipeline/masks.py", f) for f in ("decode_png_mask", "box_mask", "box_to_pixels")
    )
    rle = cum("pipeline/masks.py", "rle_encode_box") + cum("pipeline/masks.py", "rle_encode")
    json_in_send = edge("json/__init__.py", "dumps", "gemini/client.py", "_send")
    stages = {
        "read": cum("pipeline/images.py", "_read_and_hash")
        + cum("pipeline/images.py", "read_bytes"),
        "sniff": sniff,
        "verify": cum("pipeline/images.py", "_examine") - sniff,
        "encode": cum("gemini/client.py", "build_generate_content_body") + json_in_send,
        "HTTP": own(lambda k: any(lib in k[0] for lib in HTTP_LIBS))
        + own(lambda k: k[0].endswith("gemini/client.py") and k[2] == "_send")
        + own(lambda k: k[0] == "~" and any(lib in k[2] for lib in HTTP_BUILTINS)),
        "parse": cum("gemini/client.py", "parse_generate_content")
        + cum("pipeline/runner.py", "_parse")
        - mask
        - rle,
        "mask": mask,
        "RLE": rle,
        "Parquet": cum("pipeline/sink.py", "_to_table") + cum("pipeline/sink.py", "_write_part"),
        "event loop, threads": own(lambda k: any(f in k[0] for f in LOOP_FILES))
        + own(lambda k: k[0] == "~" and any(name in k[2] for name in LOOP_BUILTINS)),
    }
    stages["other (runner, limiter, rows, ...)"] = total - sum(stages.values())
    return stages, total


def _top_functions(stats: pstats.Stats, count: int) -> list[dict[str, Any]]:
    table_ = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(table_.items(), key=lambda kv: kv[1][2], reverse=True)[:count]
    out = []
    for (file, line, name), (_cc, calls, own_s, cum_s, _callers) in ranked:
        where = name if file == "~" else f"{_short(file)}:{line}({name})"
        out.append(
            {
                "function": where,
                "calls": calls,
                "own_ms": round(own_s * 1000, 1),
                "cum_ms": round(cum_s * 1000, 1),
            }
        )
    return out


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


# --------------------------------------------------------------------------------- plots
PALETTE = {"blue": (40, 90, 200), "red": (210, 50, 50), "grey": (120, 120, 120)}
SERIES_COLOURS = [(40, 90, 200), (230, 120, 30), (40, 160, 80), (150, 60, 170)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= step * mult:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def line_chart(
    path: Path,
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]],
    *,
    xlabel: str,
    ylabel: str,
    hlines: Sequence[tuple[float, str, tuple[int, int, int]]] = (),
    vlines: Sequence[float] = (),
    bars: bool = False,
    size: tuple[int, int] = (1100, 520),
) -> None:
    """A small line (or bar) chart drawn with Pillow: axes, ticks, legend, reference lines."""
    width, height = size
    left, right, top, bottom = 80, 30, 64, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    xs_all = [x for _, xs, _, _ in series for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys, _ in series for y in ys] + [y for y, _, _ in hlines] or [1.0]
    x0, x1 = min(xs_all), max(xs_all)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = max(ys_all) * 1.12 or 1.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - y / y1 * (height - top - bottom)

    draw.text((left, 12), title, fill="black", font=font)
    for y in _nice_ticks(0, y1):
        draw.line((left, py(y), width - right, py(y)), fill=(230, 230, 230))
        draw.text((left - 8, py(y)), f"{y:g}", fill="black", font=small, anchor="rm")
    for x in _nice_ticks(x0, x1, 10):
        draw.line((px(x), height - bottom, px(x), height - bottom + 5), fill="black")
        draw.text((px(x), height - bottom + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    for x in vlines:
        if x0 <= x <= x1:
            draw.line((px(x), top, px(x), height - bottom), fill=(200, 200, 200), width=1)
    draw.line((left, top, left, height - bottom, width - right, height - bottom), fill="black")
    draw.text((width / 2, height - 22), xlabel, fill="black", font=font, anchor="mm")
    draw.text((12, top - 22), ylabel, fill="black", font=small)
    for y, label, colour in hlines:
        draw.line((left, py(y), width - right, py(y)), fill=colour, width=2)
        draw.text((width - right - 4, py(y) - 4), label, fill=colour, font=small, anchor="rb")
    bar_width = max(1.0, (width - left - right) / max(len(xs_all), 1) * 0.8)
    for _name, xs, ys, colour in series:
        if bars:
            for x, y in zip(xs, ys, strict=True):
                if y > 0:
                    draw.rectangle((px(x), py(y), px(x) + bar_width, py(0)), fill=colour)
        elif len(xs) > 1:
            draw.line([(px(x), py(y)) for x, y in zip(xs, ys, strict=True)], fill=colour, width=2)
    lx = left + 12
    for i, (name, _, _, colour) in enumerate(series):
        y = top + 8 + i * 20
        draw.rectangle((lx, y, lx + 14, y + 12), fill=colour)
        draw.text((lx + 20, y - 2), name, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _plot_rate(
    path: Path, binds: str, rpm: int, tpm: int, tokens: int, when: np.ndarray, poller: StatsPoller
) -> None:
    """Requests per second over the run (accepted, from the rows) and 429s (server counters)."""
    t0 = math.floor(when[0])
    seconds = np.arange(0, math.ceil(when[-1]) - t0 + 1)
    accepted = np.bincount((when - t0).astype(int), minlength=len(seconds))[: len(seconds)]
    times = np.array([t for t, _ in poller.samples]) - t0
    counts_429 = np.array([c.get("429", 0) for _, c in poller.samples], dtype=float)
    per_second_429 = np.zeros(len(seconds))
    for i in range(1, len(times)):
        at = int(times[i])
        if 0 <= at < len(seconds):
            per_second_429[at] += counts_429[i] - counts_429[i - 1]
    limit_rps = rpm / 60 if binds == "rpm" else tpm / tokens / 60
    minutes = [m - t0 for m in range(int(when[0] // 60 + 1) * 60, int(when[-1]) + 1, 60)]
    line_chart(
        path,
        f"requests per second, {binds.upper()} binding (rpm {rpm:,}, tpm {tpm:,}); "
        "grey lines: calendar minutes",
        [
            ("accepted requests / s (rows)", seconds.tolist(), accepted.tolist(), PALETTE["blue"]),
            ("429 answers / s (server)", seconds.tolist(), per_second_429.tolist(), PALETTE["red"]),
        ],
        xlabel="seconds since the first request",
        ylabel="requests / s",
        hlines=[(limit_rps, f"limit {limit_rps:.1f}/s", PALETTE["grey"])],
        vlines=minutes,
    )


def _plot_memory(path: Path, series: Sequence[tuple[str, list[tuple[float, float]]]]) -> None:
    line_chart(
        path,
        "RSS of `pipeline run` over time (process tree, sampled every 0.25 s)",
        [
            (name, [t for t, _ in s], [mb for _, mb in s], SERIES_COLOURS[i % 4])
            for i, (name, s) in enumerate(series)
        ],
        xlabel="seconds since start",
        ylabel="RSS MB",
        hlines=[(TARGETS["memory_peak_mb_at_300k"], "300 MB target", PALETTE["red"])],
    )


# ---------------------------------------------------------------------------------- main
COMMANDS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "throughput": cmd_throughput,
    "latency": cmd_latency,
    "rate": cmd_rate,
    "memory": cmd_memory,
    "resume": cmd_resume,
    "profile": cmd_profile,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a laptop")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-record", action="store_true", help="do not append to the results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    names = list(COMMANDS) if args.command == "all" else [args.command]
    started = time.perf_counter()
    shm = Path("/dev/shm")
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"gvp-bench-{name}-"))
        fast = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        images = Path(tempfile.mkdtemp(prefix=f"gvp-bench-{name}-images-", dir=fast))
        t0 = time.perf_counter()
        try:
            figures = COMMANDS[name](Ctx(sizes, work, images, args.quick))
            figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
            if not args.no_record:
                record(name, args.quick, figures)
        finally:
            if args.keep:
                print(f"kept {work} and {images}")
            else:
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(images, ignore_errors=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
