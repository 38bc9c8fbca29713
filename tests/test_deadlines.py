"""Deadlines that tighten in flight (issue 19, item 3).

Deadlines follow 4 x the p99 of the latencies seen, but only once DEADLINE_SAMPLES are known:
the first wave was sent with the full `[api] timeout`, and a hung request of that wave held its
worker that long (80 images, 8% hanging: 124 s against 3 s calm). A request in flight now
follows the estimate as it tightens; a call so cut is abandoned (counted: it may be billed) and
retried — never hedged, so no image is bought twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.gemini import GeminiError
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.run.calls import DEADLINE_SAMPLES, DeadlineCut, Deadlines
from tests.conftest import draw_shapes, make_config, read_rows, run, until

IMAGES = 80
HANG_RATE = 0.08
SEED = 19
HOURS = 3600.0  # the cap and a hang's length: a first-wave hang kept to it would never end


async def test_a_request_in_flight_is_cut_when_the_estimate_tightens() -> None:
    deadlines = Deadlines(floor=0.0, cap=HOURS)
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(deadlines.within(never, time.monotonic()))
    await asyncio.sleep(0)  # it waits under the cap
    assert not waiting.done()
    for _ in range(DEADLINE_SAMPLES):
        deadlines.observe(0.001)  # the estimate forms: 4 ms
    with pytest.raises(DeadlineCut) as cut:
        await waiting
    assert isinstance(cut.value, GeminiError) and cut.value.kind == "timeout"
    assert never.cancelled()  # the call itself is abandoned, not left running


async def test_an_answer_in_time_is_returned_untouched() -> None:
    deadlines = Deadlines(floor=0.0, cap=HOURS)
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    answered.set_result("ok")
    assert await deadlines.within(answered, time.monotonic()) == "ok"


async def test_a_first_wave_of_hangs_is_cut_retried_and_bought_once(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    for i in range(IMAGES):
        draw_shapes(48, 48, seed=1900 + i, count=1)[0].save(images_dir / f"h{i:02d}.png")
    options = ServerOptions(
        seed=SEED, fault_rate=HANG_RATE, fault_kinds=("hang",), hang_seconds=HOURS
    )
    async with LocalServer(options) as server:
        config = make_config(
            tmp_path,
            # a floor of 2 s, not 0.5: on a saturated 2-core CI box this process can be off the
            # CPU for over half a second, and every call in flight then misses its deadline at
            # once (16 "timeouts" in a row stopped the run as an outage, once in CI)
            api={"base_url": server.base_url, "timeout": HOURS, "min_timeout": 2.0},
            limits={"concurrency": 16, "max_attempts": 8},
            task={"kind": "detect"},
        )
        summary = await run(config)
        stats = server.stats()
    hangs = stats["faults"].get("hang", 0)
    answers = sum(stats["answers_by_task"].values())
    rows = read_rows(tmp_path / "out")
    assert hangs > 0  # the seed hangs some of the first wave
    assert summary.exit_code == exits.OK and len(rows) == IMAGES
    assert {r["status"] for r in rows} == {"ok"}
    assert answers == IMAGES  # every image bought once: no hedge, no answer paid twice
    assert summary.abandoned == hangs  # each hang cut in flight, counted as maybe billed
    assert summary.abandoned_est_usd > 0
    assert summary.api_calls == IMAGES + hangs == summary.retries + IMAGES
    assert sum(r["attempts"] for r in rows) == IMAGES + hangs


async def test_calls_abandoned_by_a_second_signal_are_counted_as_maybe_billed(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19, item 9: a second Ctrl-C cancels the calls in flight; they were sent, so the
    service may bill them: the summary counts them with their estimated cost."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    for i in range(4):
        draw_shapes(48, 48, seed=1950 + i, count=1)[0].save(images_dir / f"a{i}.png")
    options = ServerOptions(seed=SEED, fault_rate=1.0, fault_kinds=("hang",), hang_seconds=HOURS)
    async with LocalServer(options) as server:
        config = make_config(
            tmp_path,
            api={"base_url": server.base_url, "timeout": HOURS, "min_timeout": HOURS},
            limits={"concurrency": 4},
            task={"kind": "detect"},
        )
        running = asyncio.ensure_future(run(config))
        await until(lambda: server.stats()["faults"].get("hang", 0) == 4, exited=_result(running))
        os.kill(os.getpid(), signal.SIGINT)  # drain: the four hang on
        os.kill(os.getpid(), signal.SIGINT)  # abandon them
        summary = await running
    assert summary.stop_reason == "interrupted" and summary.exit_code == exits.STOPPED
    assert (summary.api_calls, summary.abandoned) == (4, 4)
    assert summary.abandoned_est_usd > 0
    assert "4 call(s) sent, no answer: may be billed" in summary.abandoned_line()
    written = json.loads((tmp_path / "out" / ".runs" / f"{summary.run_id}.json").read_text())
    assert written["abandoned"] == 4
    assert written["abandoned_est_usd"] == summary.abandoned_est_usd


def _result(task: asyncio.Future[object]) -> Callable[[], object]:
    return lambda: task if task.done() else None
