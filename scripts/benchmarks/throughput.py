"""Throughput: segment task, zero-latency server, the pipeline vs the SDK script vs the seed loop.

Twice: against the server answering from pixels (it analyses every image and renders its masks,
~3 ms of CPU a request on this machine's other core), then against the same server replaying
those very answers by image sha256 (`--replay`), which leaves the two cores to the clients, as the
real service would. Each contender gets a fresh server. The contenders: `python -m pipeline run`,
scripts/baseline_sdk.py (the SDK's async client under a semaphore) and scripts/baseline_seed.py
(the guide's sample in a loop, on the first `seed_images` of the same images).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from .harness import (
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
from .scenes import make_scenes

TARGET_VS_SDK = 2.0  # x the SDK script's images/s
TARGET_IMAGES_PER_S = 300.0
# Answering from pixels costs the server ~3 ms of CPU a request: two worker processes let it use
# both cores instead of capping every contender at one core's worth.
ANALYSING_WORKERS = 2
SIDE = 384

COLUMNS = (  # (table header, figure key)
    ("images", "images"),
    ("ok", "ok"),
    ("objects", "objects"),
    ("wall s", "wall_s"),
    ("images/s", "images_per_s"),
    ("in-run img/s", "in_run_images_per_s"),
    ("client CPU ms/img", "client_cpu_ms_per_image"),
    ("server CPU ms/img", "server_cpu_ms_per_image"),
    ("server CPU util", "server_cpu_utilisation"),
    ("peak RSS MB", "peak_rss_mb"),
)

Measured = tuple[Proc, int, int, int, float]  # process, ok, errors, objects, in-run seconds


@dataclass(frozen=True)
class Sizes:
    images: int
    seed_images: int  # the sequential seed loop runs on the first N of the same images
    concurrency: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes, work = ctx.sizes, ctx.work
    n, conc = sizes.images, sizes.concurrency
    images = ctx.images / "scenes"
    t0 = time.perf_counter()
    shapes = make_scenes(images, n, SIDE)
    print(f"made {n} {SIDE}-px scenes ({shapes} shapes) in {time.perf_counter() - t0:.1f} s")
    results: dict[str, dict[str, dict[str, Any]]] = {"analysing": {}, "replay": {}}
    replay: dict[str, Any] = {}

    def measure(mode: str, name: str, count: int, go: Callable[[Server], Measured]) -> None:
        workers = ANALYSING_WORKERS if mode == "analysing" else None
        with Server(ctx.logs / f"{mode}-{name}", seed=SEED, workers=workers, **replay) as server:
            cpu0 = server.cpu_seconds()
            measured = go(server)
            server_cpu = server.cpu_seconds() - cpu0
            replayed = server.stats().get("replayed", 0)
        results[mode][name] = _contender(count, measured, replayed, server_cpu)

    def pipeline(mode: str) -> Callable[[Server], Measured]:
        def go(server: Server) -> Measured:
            name = f"pipeline-{mode}"
            config = write_config(ctx, name, server.url, inputs=[images], concurrency=conc)
            proc, summary = run_pipeline(ctx, config)
            rows = read_rows(ctx.output(name), ["status", "objects"])
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
            logs = ctx.logs / mode
            proc, s = run_script(f"baseline_{name}.py", server.url, images, out, logs, *extra)
            return proc, s["ok"], s["errors"], s["objects"], s["seconds"]

        return go

    for mode in ("analysing", "replay"):
        if mode == "replay":
            replay["replay"] = _replay_file(ctx, images, sizes.seed_images)
        measure(mode, "pipeline", n, pipeline(mode))
        measure(mode, "sdk", n, script(mode, "sdk", "--concurrency", str(conc)))
        measure(
            mode, "seed", sizes.seed_images, script(mode, "seed", "--limit", str(sizes.seed_images))
        )
    figures = _figures(n, shapes, conc, results)
    _print(figures, sizes)
    return figures


def _contender(count: int, measured: Measured, replayed: int, server_cpu: float) -> dict[str, Any]:
    proc, ok, errors, objects, run_s = measured
    return {
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


def _figures(
    n: int, shapes: int, conc: int, results: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "images": n,
        "image_side": SIDE,
        "shapes_drawn": shapes,
        "concurrency": conc,
        "results": results,
        "target_ratio_vs_sdk": TARGET_VS_SDK,
        "target_images_per_s": TARGET_IMAGES_PER_S,
    }
    for mode, by_name in results.items():
        p, s, q = (by_name[k]["images_per_s"] for k in ("pipeline", "sdk", "seed"))
        figures[f"ratio_vs_sdk_{mode}"] = round(p / s, 2)
        figures[f"ratio_vs_seed_{mode}"] = round(p / q, 2)
        p, s = (by_name[k]["in_run_images_per_s"] for k in ("pipeline", "sdk"))
        figures[f"in_run_ratio_vs_sdk_{mode}"] = round(p / s, 2)
    return figures


def _print(figures: dict[str, Any], sizes: Sizes) -> None:
    results = figures["results"]
    table(
        f"throughput: segment, {sizes.images} x {SIDE}-px PNG scenes (seed loop: first "
        f"{sizes.seed_images}), zero-latency local server, concurrency {sizes.concurrency}; "
        "wall time of the whole process",
        ["server", "contender", *(header for header, _ in COLUMNS)],
        [
            [mode, k, *(r[key] for _, key in COLUMNS)]
            for mode, by_name in results.items()
            for k, r in by_name.items()
        ],
    )
    for mode in results:
        print(
            f"{mode} server: pipeline / SDK script = {figures[f'ratio_vs_sdk_{mode}']}x "
            f"(target >= {TARGET_VS_SDK:g}x), {figures[f'in_run_ratio_vs_sdk_{mode}']}x in-run; "
            f"pipeline / seed loop = {figures[f'ratio_vs_seed_{mode}']}x; "
            f"pipeline {results[mode]['pipeline']['images_per_s']} images/s "
            f"(target >= {TARGET_IMAGES_PER_S:g})"
        )


def _replay_file(ctx: Ctx[Sizes], images: Path, seed_count: int) -> Path:
    """The analysing server's answers, keyed by the sha256 of the bytes each client sends.

    The pipeline and the SDK script send the files as they are; the seed loop sends what the SDK
    makes of a Pillow image (re-encoded PNG), so its first `seed_count` images get their own keys.
    """
    from google.genai import _transformers

    from pipeline.gemini.client import parse_generate_content

    columns = ["image_path", "image_sha256", "raw_response"]
    rows = read_rows(ctx.output("pipeline-analysing"), columns)
    path = ctx.work / "replay.jsonl"
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


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=1500, seed_images=300, concurrency=32),
    full=Sizes(images=6000, seed_images=1000, concurrency=32),
    smoke=Sizes(images=8, seed_images=2, concurrency=4),
)
