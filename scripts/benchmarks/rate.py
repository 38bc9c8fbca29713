"""Rate limits: the server enforces RPM and TPM in calendar-minute windows, the pipeline is given
the same limits and paces itself; one phase where RPM binds (and TPM has room), one where TPM does.

Each phase plots requests per second (accepted, from the rows; 429s, from the server's counters)
to docs/bench/rate-{rpm,tpm}[-quick].png.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .harness import (
    LOCAL_KEY,
    MODEL,
    SEED,
    Benchmark,
    Ctx,
    Proc,
    Server,
    completed_seconds,
    read_rows,
    run_pipeline,
    shown,
    table,
    write_config,
)
from .plots import PALETTE, line_chart
from .scenes import make_tiny

TARGET_FRACTION = 0.97  # of the binding limit
TARGET_429_FRACTION = 0.005  # of all requests, at most
CONCURRENCY = 64
HEADROOM = 1.25  # the limit that does not bind is this much above what the phase needs


@dataclass(frozen=True)
class Sizes:
    phases: tuple[tuple[str, float], ...]  # (which limit binds, seconds of requests)
    rpm: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    rpm = sizes.rpm
    total = sum(int(seconds * rpm / 60 * 1.02) + 20 for _, seconds in sizes.phases)
    folders = make_tiny(ctx.images / "tiny", total)
    tokens = _probe_prompt_tokens(ctx, next(folders[0].iterdir()))
    phases, start_at = [], 0
    for binds, seconds in sizes.phases:
        # The binding limit is the configured one; the other is enforced with room to spare.
        if binds == "rpm":
            limit_rpm, limit_tpm = rpm, int(rpm * tokens * HEADROOM)
        else:
            limit_rpm, limit_tpm = int(rpm * HEADROOM), int(rpm * tokens)
        n = int(seconds * rpm / 60)
        phase_images = ctx.images / f"rate-{binds}"
        phase_images.mkdir()
        # This phase's own images: symlink the next n tiny files into one folder.
        for i, path in enumerate(_iter_files(folders, start_at, n)):
            (phase_images / f"{i:06d}.png").symlink_to(path)
        start_at += n
        name = f"rate-{binds}"
        with Server(ctx.logs / name, seed=SEED, rpm=limit_rpm, tpm=limit_tpm) as s:
            config = write_config(
                ctx,
                name,
                s.url,
                inputs=[phase_images],
                concurrency=CONCURRENCY,
                rpm=limit_rpm,
                tpm=limit_tpm,
            )
            with StatsPoller(s) as poller:
                proc, summary = run_pipeline(ctx, config)
        out, plot = ctx.output(name), ctx.plot(name)
        phases.append(
            _phase_figures(binds, limit_rpm, limit_tpm, tokens, out, proc, summary, poller, plot)
        )
    figures = {"prompt_tokens_per_request": tokens, "phases": phases}
    figures["targets"] = {"fraction": TARGET_FRACTION, "max_429_fraction": TARGET_429_FRACTION}
    _print(phases)
    return figures


def _probe_prompt_tokens(ctx: Ctx[Sizes], sample: Path) -> int:
    """Billed input tokens of one request as the pipeline builds it (asked of a probe server)."""
    from dataclasses import replace

    from pipeline.config import load_config
    from pipeline.gemini.client import build_generate_content_body
    from pipeline.gemini.types import ImagePart
    from pipeline.tasks import get_task

    with Server(ctx.logs / "probe", seed=SEED) as server:
        config = load_config(
            write_config(ctx, "probe", server.url, inputs=[sample.parent], concurrency=1)
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
        self.samples.append((time.time(), self.server.generate_counts()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)


def _iter_files(folders: Sequence[Path], skip: int, count: int) -> Iterator[Path]:
    seen = 0
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if seen >= skip + count:
                return
            if seen >= skip:
                yield path
            seen += 1


def _phase_figures(
    binds: str,
    rpm: int,
    tpm: int,
    tokens: int,
    out: Path,
    proc: Proc,
    summary: dict[str, Any],
    poller: StatsPoller,
    plot: Path,
) -> dict[str, Any]:
    rows = read_rows(out, ["status", "completed_at", "prompt_tokens"])
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    when = np.sort(completed_seconds(ok))
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
    _plot(plot, binds, rpm, tpm, tokens, when, poller)
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
        "plot": shown(plot),
    }


def _print(phases: Sequence[dict[str, Any]]) -> None:
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


def _plot(
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


BENCHMARK = Benchmark(
    run,
    quick=Sizes(phases=(("rpm", 120.0),), rpm=600),
    full=Sizes(phases=(("rpm", 240.0), ("tpm", 240.0)), rpm=1200),
    smoke=Sizes(phases=(("rpm", 2.0),), rpm=600),
)
