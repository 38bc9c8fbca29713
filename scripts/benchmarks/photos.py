"""Photos (issue 22): detect and segment on camera-sized photos, with and without `max_side`,
the pipeline side by side with the SDK script, and where the pipeline's CPU goes by stage.

The images (camera.py, cached on disk): 12-MP camera-like JPEGs (4000x3000 and 4032x3024, quality
90, every 4th with EXIF orientation 6), a few PNG screenshots and a few HEIC. One local server at
zero latency, answering from pixels, serves every run. For each task and `max_side`:

- pipeline: `python -m pipeline run` as shipped (verify on), a measured child process: wall, CPU
  (wait4) and peak RSS of the process tree;
- SDK script: scripts/baseline_sdk.py with the same task and `--max-side` (`Image.thumbnail`, the
  way its users downscale), measured the same way;
- profiled: the pipeline again, in this process, on every k-th image (the same mix of kinds)
  under cProfile in every thread on the thread CPU clock, its CPU split into stages.

The machine is shared with other work, so CPU an image is the main figure, and images/s per core
is 1000 / that; wall-clock images/s is printed too but moves with the neighbours.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .camera import PhotoSet, photo_set
from .harness import (
    LOCAL_KEY,
    SEED,
    Benchmark,
    Ctx,
    Proc,
    Server,
    read_rows,
    run_pipeline,
    run_script,
    table,
    write_config,
)
from .profiling import Calls, thread_profile

# The stages name the functions of pipeline/inputs/ that verify and read (a rewrite of prepare
# that renames them must rename them here too, or their time shows under "other"); Pillow's
# decodes, resizes and saves are found by being called from anywhere in pipeline/inputs/. The
# verify decode is the one `_examine` calls itself (a re-encode's decode is `_reencode`'s).
IMAGES = "pipeline/inputs/images.py"
INPUTS = "pipeline/inputs/"
RESAMPLE = "pipeline/inputs/resample.py"  # the OpenCV resize and rotation ([photos] extra)
PIL_IMAGE = "PIL/Image.py"
DECODERS = (("PIL/ImageFile.py", "load"), ("pillow_heif/as_plugin.py", "load"))
VERIFY_CALLER = "_examine"
RESIZERS = ("resize", "reduce", "thumbnail", "transpose", "convert")
MASKS = ("decode_png_mask", "box_mask", "box_to_pixels", "rle_encode_box", "rle_encode")
COLUMNS = (  # (table header, figure key)
    ("images", "images"),
    ("ok", "ok"),
    ("objects", "objects"),
    ("CPU ms/img", "cpu_ms_per_image"),
    ("img/s per core", "images_per_core_s"),
    ("peak RSS MB", "peak_rss_mb"),
    ("wall s", "wall_s"),
    ("img/s (wall)", "images_per_s"),
    ("server CPU ms/img", "server_cpu_ms_per_image"),
)


@dataclass(frozen=True)
class Sizes:
    photos: PhotoSet
    tasks: tuple[str, ...]
    max_sides: tuple[int | None, ...]
    concurrency: int
    profiled: int  # images of the set (every k-th, the same mix) profiled in-process per pair


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    folder = photo_set(sizes.photos)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    runs: dict[str, dict[str, Any]] = {}
    with Server(ctx.logs / "server", seed=SEED) as server:
        for task in sizes.tasks:
            for side in sizes.max_sides:
                runs[_label(task, side)] = _pair(ctx, server, folder, files, task, side)
    figures = {
        "images": _describe(files),
        "concurrency": sizes.concurrency,
        "runs": runs,
    }
    _print(figures)
    return figures


def _label(task: str, side: int | None) -> str:
    return f"{task}, max_side {side or 'none'}"


def _pair(
    ctx: Ctx[Sizes], server: Server, folder: Path, files: list[Path], task: str, side: int | None
) -> dict[str, Any]:
    """One task at one `max_side`: the pipeline, the SDK script, the profiled pipeline."""
    name = f"{task}-{side or 'asis'}"
    config = _config(ctx, name, server.url, [folder], task, side)
    pipeline = _measured(server, len(files), lambda: _pipeline(ctx, config))
    out = ctx.work / f"sdk-{name}.parquet"
    extra = ["--task", task, "--concurrency", str(ctx.sizes.concurrency)]
    extra += ["--max-side", str(side)] if side else []
    sdk = _measured(server, len(files), lambda: _sdk(ctx, server.url, folder, out, extra))
    sample = files[:: max(1, len(files) // ctx.sizes.profiled)]
    profiled = _config(ctx, f"profiled-{name}", server.url, sample, task, side)
    return {"pipeline": pipeline, "sdk": sdk, "profile": _profile(profiled, server.url, sample)}


def _config(
    ctx: Ctx[Sizes], name: str, url: str, inputs: Sequence[Path], task: str, side: int | None
) -> Path:
    """The harness's config, plus `[images] max_side` when one is asked for."""
    path = write_config(ctx, name, url, inputs=inputs, concurrency=ctx.sizes.concurrency, kind=task)
    if side:
        path.write_text(path.read_text() + f"[images]\nmax_side = {side}\n")
    return path


Counted = tuple[Proc, int, int]  # the process, ok rows, objects


def _pipeline(ctx: Ctx[Sizes], config: Path) -> Counted:
    proc, summary = run_pipeline(ctx, config)
    objects = read_rows(ctx.output(config.stem), ["objects"]).column("objects").to_pylist()
    return proc, summary["rows"].get("ok", 0), sum(len(o) for o in objects if o)


def _sdk(ctx: Ctx[Sizes], url: str, folder: Path, out: Path, extra: list[str]) -> Counted:
    logs = ctx.logs / out.stem  # one folder a run: the script's log files are named after it
    proc, summary = run_script("baseline_sdk.py", url, folder, out, logs, *extra)
    return proc, summary["ok"], summary["objects"]


def _measured(server: Server, images: int, go: Callable[[], Counted]) -> dict[str, Any]:
    """Run one contender; its CPU, memory and wall, and the server's CPU meanwhile."""
    server_cpu = server.cpu_seconds()
    proc, ok, objects = go()
    server_cpu = server.cpu_seconds() - server_cpu
    cpu_ms = proc.cpu_seconds / images * 1000
    return {
        "images": images,
        "ok": ok,
        "objects": objects,
        "cpu_ms_per_image": round(cpu_ms, 1),
        "images_per_core_s": round(1000 / cpu_ms, 2),
        "peak_rss_mb": round(proc.peak_rss_mb, 1),
        "wall_s": round(proc.wall, 2),
        "images_per_s": round(images / proc.wall, 2),
        "server_cpu_ms_per_image": round(server_cpu / images * 1000, 1),
    }


def _profile(config_path: Path, url: str, sample: list[Path]) -> dict[str, Any]:
    """The pipeline in this process under cProfile in every thread: CPU ms an image by stage."""
    from pipeline.config import load_config, with_overrides
    from pipeline.engines import RunOptions
    from pipeline.engines import run as run_in_process

    os.environ["GEMINI_API_KEY"] = LOCAL_KEY
    config = with_overrides(load_config(config_path), {"api.base_url": url})
    stats = thread_profile(lambda: run_in_process(config, RunOptions(progress=False)))
    stats.dump_stats(config_path.with_suffix(".pstats"))  # kept with --keep, for a closer look
    calls = Calls(stats)
    n = len(sample)
    return {
        "images": n,
        "thread_cpu_ms_per_image": round(calls.total / n * 1000, 1),
        "stage_ms_per_image": {k: round(v / n * 1000, 2) for k, v in stages(calls).items()},
    }


def stages(calls: Calls) -> dict[str, float]:
    """Thread CPU seconds of the run by stage. Pillow's work is told apart by its caller:
    a decode called by the verify functions is verify, one called by the rest of
    pipeline/inputs/ is decode; resizes and saves count when pipeline/inputs/ calls them (a
    mask's resize is the mask's)."""
    verify = calls.cum(IMAGES, "_verify_png")
    verify += sum(calls.edge(f, name, IMAGES, VERIFY_CALLER) for f, name in DECODERS)
    decode = sum(calls.edge(f, name, INPUTS) for f, name in DECODERS)
    decode -= sum(calls.edge(f, name, IMAGES, VERIFY_CALLER) for f, name in DECODERS)
    mask = calls.cum("pipeline/masks.py", *MASKS)
    found = {
        "read + hash": calls.cum(IMAGES, "_read_and_hash", "read_bytes"),
        "verify": verify,
        "decode": decode,
        "resize, rotate, convert": sum(calls.edge(PIL_IMAGE, f, INPUTS) for f in RESIZERS)
        + calls.cum(RESAMPLE, "downscale"),
        "encode": calls.edge(PIL_IMAGE, "save", INPUTS),
        "request (body, base64, JSON, HTTP)": calls.cum(
            "gemini/content.py", "build_generate_content_body"
        )
        + calls.cum("gemini/transport.py", "send"),
        "parse": calls.cum("gemini/content.py", "parse_generate_content")
        + calls.cum("pipeline/tasks/__init__.py", "read_answer")
        - mask,
        "mask (decode, place, RLE)": mask,
        "rows, Parquet": calls.cum("pipeline/records.py", "to_table")
        + calls.cum("pipeline/output/parts.py", "write_part"),
        "event loop, threads": calls.event_loop(),
    }
    found["other (open, EXIF, runner, ...)"] = calls.total - sum(found.values())
    return found


def _describe(files: list[Path]) -> dict[str, Any]:
    """Counts and mean sizes of the images, by kind (the folder they are in)."""
    kinds: dict[str, list[int]] = {}
    for path in files:
        kinds.setdefault(path.parent.name, []).append(path.stat().st_size)
    described: dict[str, Any] = {"total": len(files)}
    for kind, sizes in kinds.items():
        described[kind] = {"count": len(sizes), "mean_mb": round(sum(sizes) / len(sizes) / 1e6, 2)}
    return described


def _print(figures: dict[str, Any]) -> None:
    images = figures["images"]
    kinds = ", ".join(f"{v['count']} {k} (mean {v['mean_mb']} MB)" for k, v in _kinds(images))
    runs = figures["runs"]
    table(
        f"photos: {kinds}; zero-latency local server, concurrency {figures['concurrency']}; "
        "CPU of the whole client process (wait4), peak RSS of its tree",
        ["run", "contender", *(header for header, _ in COLUMNS)],
        [
            [label, who, *(r[who][key] for _, key in COLUMNS)]
            for label, r in runs.items()
            for who in ("pipeline", "sdk")
        ],
    )
    names = list(next(iter(runs.values()))["profile"]["stage_ms_per_image"])
    table(
        "photos: the pipeline's CPU ms an image by stage (cProfile in every thread, thread CPU "
        "clock, every k-th image of the same set, in-process)",
        ["stage", *runs],
        [
            *([n, *(r["profile"]["stage_ms_per_image"][n] for r in runs.values())] for n in names),
            ["total (profiled)", *(r["profile"]["thread_cpu_ms_per_image"] for r in runs.values())],
            ["images profiled", *(r["profile"]["images"] for r in runs.values())],
        ],
    )


def _kinds(images: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in images.items() if isinstance(v, dict)]


FULL_JPEGS = 300  # "a few hundred" (issue 22); `bench.py photos --photos N` sets another count


def with_jpegs(benchmark: Benchmark[Sizes], jpegs: int) -> Benchmark[Sizes]:
    """`benchmark` with `jpegs` camera JPEGs at its full and quick sizes (`--photos N`)."""

    def sized(sizes: Sizes) -> Sizes:
        return replace(sizes, photos=replace(sizes.photos, jpegs=jpegs))

    return replace(benchmark, quick=sized(benchmark.quick), full=sized(benchmark.full))


BENCHMARK = Benchmark(
    run,
    quick=Sizes(
        photos=PhotoSet(jpegs=40, pngs=4, heics=2),
        tasks=("detect", "segment"),
        max_sides=(None, 1536),
        concurrency=8,
        profiled=12,
    ),
    full=Sizes(
        photos=PhotoSet(jpegs=FULL_JPEGS, pngs=8, heics=4),
        tasks=("detect", "segment"),
        max_sides=(None, 1536),
        concurrency=8,
        profiled=32,
    ),
    smoke=Sizes(
        photos=PhotoSet(jpegs=2, pngs=1, heics=1, scale=0.1),
        tasks=("segment",),
        max_sides=(160,),
        concurrency=4,
        profiled=4,
    ),
)
