"""Memory bounded by decoded pixels, not by concurrency (issue 22, item 2): the budget itself,
the runner admitting each decode against it (its peak observed, no timing), a run whose budget is
smaller than any image, and Pillow's DecompressionBombWarning never printed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.run.decodes import MB, PER_CORE, DecodeBudget, budget_bytes, usable_memory
from pipeline.run.runner import SMALL_DECODE, SMALL_FILE, ImageRunner
from tests.conftest import make_config, read_current, run
from tests.image_quality import photo
from tests.test_images import source_for


class Holder:
    """One decode holding its bytes until the test lets it go."""

    def __init__(self, budget: DecodeBudget, size: int) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.task = asyncio.ensure_future(self._hold(budget, size))

    async def _hold(self, budget: DecodeBudget, size: int) -> None:
        async with budget.admitted(size):
            self.entered.set()
            await self.release.wait()


async def settle() -> None:
    """Let every ready task run until each waits on something only the test sets."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_decodes_wait_while_the_budget_is_held_and_go_in_their_order() -> None:
    budget = DecodeBudget(100)
    first, second, third = (Holder(budget, 40) for _ in range(3))
    await settle()
    assert (first.entered.is_set(), second.entered.is_set(), third.entered.is_set()) == (
        True,
        True,
        False,
    )
    assert budget.held == 80
    small = Holder(budget, 10)  # would fit, but a decode waiting goes first
    await settle()
    assert not small.entered.is_set()
    first.release.set()
    await settle()
    assert third.entered.is_set() and small.entered.is_set()
    for holder in (second, third, small):
        holder.release.set()
    await asyncio.gather(*(h.task for h in (first, second, third, small)))
    assert (budget.held, budget.peak) == (0, 90)


async def test_an_image_larger_than_the_budget_goes_alone() -> None:
    budget = DecodeBudget(100)
    small, huge = Holder(budget, 30), Holder(budget, 500)
    await settle()
    assert small.entered.is_set() and not huge.entered.is_set()
    small.release.set()
    await settle()
    assert huge.entered.is_set() and budget.held == 500
    after = Holder(budget, 1)
    await settle()
    assert not after.entered.is_set()  # alone: nothing beside it
    huge.release.set()
    after.release.set()
    await asyncio.gather(small.task, huge.task, after.task)
    assert budget.held == 0


async def test_a_cancelled_waiter_lets_the_ones_behind_it_in() -> None:
    budget = DecodeBudget(100)
    holder, big, small = Holder(budget, 60), Holder(budget, 90), Holder(budget, 30)
    await settle()
    assert not big.entered.is_set() and not small.entered.is_set()
    big.task.cancel()  # a run stopped while this image waited
    await settle()
    assert small.entered.is_set() and budget.held == 90
    holder.release.set()
    small.release.set()
    await asyncio.gather(holder.task, small.task)
    assert big.task.cancelled() and budget.held == 0


def test_the_budget_is_a_setting_with_a_default_from_the_machine() -> None:
    assert budget_bytes(300) == 300 * MB
    default = budget_bytes(None)
    assert MB <= default <= usable_memory() // 4
    assert default <= PER_CORE * len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        DecodeBudget(0)


def flat_png(path: Path, seed: int) -> Path:
    """A small file that decodes to many pixels (a screenshot): 1600x1400, a few shapes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (1600, 1400), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = (int(v) for v in rng.integers(0, 1200, 2))
        draw.rectangle(
            (x, y, x + 300, y + 150), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    image.save(path, "PNG")
    return path


@pytest.mark.parametrize(("room", "peak"), [(2.5, 2), (8, 8)])
async def test_the_runner_admits_each_decode_against_the_budget(
    tmp_path: Path, room: float, peak: int
) -> None:
    """8 screenshots prepared at once, as a pool of 8 does: each small enough to be read on
    the event loop, each decode big enough for a thread. All 8 reach the budget in the loop's
    first pass (before any thread can finish), so what it admits then is its peak: 2 when 2.5
    decodes fit, all 8 when they all do."""
    sources = [source_for(flat_png(tmp_path / f"s{i}.png", seed=i)) for i in range(8)]
    assert all(source.size <= SMALL_FILE for source in sources)
    cost = 1600 * 1400 * 4 * 2  # RGB in 4 bytes a pixel, the decode and the resize's copy
    assert cost > SMALL_DECODE
    config = make_config(tmp_path, images={"max_side": 400})
    decodes = DecodeBudget(int(cost * room))
    runner = ImageRunner(config, None, buyer=None, bought=None, sink=None, decodes=decodes)
    items = await asyncio.gather(*(runner._prepared(source) for source in sources))
    assert [(item.error, item.sent_width) for item in items] == [(None, 400)] * 8
    assert (decodes.peak, decodes.held) == (peak * cost, 0)


async def test_a_run_whose_budget_is_smaller_than_any_image_still_answers_each(
    tmp_path: Path,
) -> None:
    """Each 1200x900 JPEG to 600 px decodes at 1/2 scale (2.2 MB): past a 1-MB budget, so
    each goes alone, and every image still gets its row."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(photo(1200, 900, seed=i)).save(folder / f"p{i}.jpg", quality=90)
    config = make_config(
        tmp_path,
        task={"kind": "detect"},
        limits={"concurrency": 8},
        images={"max_side": 600, "decode_budget_mb": 1},
    )
    summary = await run(config)
    rows = read_current(tmp_path / "out")
    assert summary.api_calls == 6
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert {(row["width"], row["height"]) for row in rows.values()} == {(1200, 900)}


BOMB_SCRIPT = """
import logging, sys
from PIL import Image
from pipeline.inputs import images
from pipeline.records import SourceFile

Image.MAX_IMAGE_PIXELS = 10_000  # so that a small real image is past Pillow's guard
folder = sys.argv[1]
for name, size in (("a.png", (120, 100)), ("b.png", (110, 100)), ("c.png", (200, 200))):
    Image.new("RGB", size, (200, 30, 30)).save(f"{folder}/{name}")
    item = images.prepare(SourceFile(f"{folder}/{name}", folder, name), max_side=50)
    print(name, item.error or f"ok {item.sent_width}x{item.sent_height}")
"""


def test_pillows_bomb_warning_is_logged_once_and_never_printed(tmp_path: Path) -> None:
    """Between MAX_IMAGE_PIXELS and twice that, Pillow warns on stderr at every run: the
    pipeline decodes such an image under its budget and logs it once. Past twice, the guard
    (kept on) makes it a row with its reason. A child process: warnings are per process."""
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.stdout.splitlines() == [
        "a.png ok 50x42",
        "b.png ok 50x45",
        "c.png image too large: 200x200 pixels exceeds the decompression-bomb limit",
    ]
    assert "DecompressionBombWarning" not in done.stderr
    assert done.stderr.count("past Pillow's MAX_IMAGE_PIXELS") == 1, done.stderr
