"""The `settings` simulation (pipeline/localserver/simulation.py) against the exact answers.

Two real servers over loopback answer the same images: one exact (the default), one under
`simulate = "settings"`. Misses, label slips and box / mask IoU are counted here, from the
answers' own boxes and masks, against the exact server's: a lite model misses and slips at the
documented rates, a pro model not at all, and a coarser view (an image sent smaller, a lower
media resolution) draws boxes and masks further from the exact ones.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as cocomask

from pipeline import exits
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.rules import describe_rules
from pipeline.localserver.server import LocalServer
from pipeline.localserver.simulation import PARAMETERS, tier_of
from tests.conftest import REPO, box_iou, make_config, mask_iou, read_current, run, scene_png
from tests.localserver_support import (
    DETECT,
    SEGMENT,
    answer_text,
    b64,
    decode_png_mask,
    generate,
    inline_request,
    interact,
)

SAMPLES = sorted(
    path
    for path in (REPO / "data" / "samples").rglob("*")
    if path.suffix in (".png", ".jpg", ".webp")  # the types generateContent takes
)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
SCENES = 150  # generated 96 x 96 scenes of two shapes: 300 objects
LITE = "gemini-2.5-flash-lite"  # tiles: a <= 384-px image is seen whole
PRO = "gemini-3.1-pro-preview"  # budget: HIGH's 1,120 tokens see up to ~1,600 px
FLASH = "gemini-2.5-flash"  # segments (PNG masks); LOW: 64 tokens, a ~382-px view
NO_THINKING = {"thinkingConfig": {"thinkingBudget": 0}}
THINKING = {"thinkingConfig": {"thinkingBudget": 512}}
LOW = {"mediaResolution": "MEDIA_RESOLUTION_LOW"}

Image_ = tuple[bytes, str]  # bytes, MIME type


@pytest.fixture
async def servers() -> AsyncIterator[tuple[LocalServer, LocalServer]]:
    """(exact, simulated): the same server twice, the second under the simulation."""
    async with (
        LocalServer(ServerOptions()) as exact,
        LocalServer(ServerOptions(simulate="settings")) as simulated,
    ):
        yield exact, simulated


async def answer(
    http: aiohttp.ClientSession,
    server: LocalServer,
    image: Image_,
    model: str,
    config: dict[str, Any] | None = None,
    prompt: str = DETECT,
) -> list[dict[str, Any]]:
    body_sent = inline_request(image[0], prompt, image[1], config)
    status, body = await generate(http, server, body_sent, model)
    assert status == 200, body
    return json.loads(answer_text(body).removeprefix("```json\n").removesuffix("\n```"))


async def answers(
    http: aiohttp.ClientSession,
    server: LocalServer,
    images: Sequence[Image_],
    model: str,
    config: dict[str, Any] | None = None,
    prompt: str = DETECT,
) -> list[list[dict[str, Any]]]:
    calls = (answer(http, server, image, model, config, prompt) for image in images)
    return list(await asyncio.gather(*calls))


def scenes() -> list[Image_]:
    return [(scene_png(seed), "image/png") for seed in range(SCENES)]


def samples() -> list[Image_]:
    return [(path.read_bytes(), MIME[path.suffix]) for path in SAMPLES]


def shrunk(image: Image_, side: int) -> Image_:
    """The image as a run with `[images] max_side = side` sends it (a PNG, Lanczos)."""
    picture = Image.open(io.BytesIO(image[0])).convert("RGB")
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    buffer = io.BytesIO()
    picture.resize(size, Image.Resampling.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue(), "image/png"


def best_match(item: dict[str, Any], found: list[dict[str, Any]]) -> tuple[float, Any]:
    """(box IoU, object) of the answer's object closest to `item`; (0, None) if none."""
    scored = [(box_iou(item["box_2d"], other["box_2d"]), other) for other in found]
    return max(scored, key=lambda pair: pair[0], default=(0.0, None))


def tally(exact: list[list[dict]], got: list[list[dict]]) -> dict[str, Any]:
    """The count of objects, the misses (no object at IoU >= 0.5) and slips (a match with
    another label), each as (image, exact box), and the matches' box IoUs, over every image."""
    counts: dict[str, Any] = {"objects": 0, "missed": set(), "slipped": set(), "ious": []}
    for index, (truth, found) in enumerate(zip(exact, got, strict=True)):
        for item in truth:
            counts["objects"] += 1
            key = (index, tuple(item["box_2d"]))
            iou, match = best_match(item, found)
            if iou < 0.5:
                counts["missed"].add(key)
                continue
            counts["ious"].append(iou)
            if match["label"] != item["label"]:
                counts["slipped"].add(key)
    return counts


def rates(counts: dict[str, Any]) -> tuple[float, float]:
    """(share of objects missed, share of the answered ones slipped)."""
    missed, slipped = len(counts["missed"]), len(counts["slipped"])
    return missed / counts["objects"], slipped / (counts["objects"] - missed)


# ------------------------------------------------------------------------- seeded


async def test_the_same_request_gets_the_same_answer_whatever_came_before(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """Seeded by the image, the model, the settings and --seed: not by time or call order."""
    _, simulated = servers
    images = [shrunk(image, 160) for image in samples()]
    first = await answers(http, simulated, images, LITE, LOW)
    await answers(http, simulated, images[::-1], FLASH)  # other requests in between
    again = await answers(http, simulated, images[::-1], LITE, LOW)
    assert first == again[::-1]
    async with LocalServer(ServerOptions(simulate="settings")) as fresh:
        assert await answers(http, fresh, images, LITE, LOW) == first
    async with LocalServer(ServerOptions(simulate="settings", seed=7)) as other:
        assert await answers(http, other, images, LITE, LOW) != first  # another draw


async def test_both_api_flavours_see_through_the_same_simulation(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """generateContent and Interactions, each image at LOW per part, answer alike: the
    simulation sits below the surfaces, in the answerer (Batch Mode lines pass it too)."""
    exact, simulated = servers
    images = scenes()[:30]
    part = {"media_resolution": {"level": "MEDIA_RESOLUTION_LOW"}}
    generated = [await _generated(http, simulated, data, part) for data, _ in images]
    interacted = [await _interacted(http, simulated, data) for data, _ in images]
    assert generated == interacted
    assert generated != [await _generated(http, exact, data, part) for data, _ in images]


async def _generated(
    http: aiohttp.ClientSession, server: LocalServer, data: bytes, part: dict[str, Any]
) -> Any:
    body = inline_request(data, DETECT, config={"thinkingConfig": {"thinkingLevel": "MINIMAL"}})
    body["contents"][0]["parts"][0].update(part)
    status, answered = await generate(http, server, body, "gemini-3.1-flash-lite")
    assert status == 200, answered
    return json.loads(answer_text(answered).removeprefix("```json\n").removesuffix("\n```"))


async def _interacted(http: aiohttp.ClientSession, server: LocalServer, data: bytes) -> Any:
    items = [
        {"type": "image", "data": b64(data), "mime_type": "image/png", "resolution": "low"},
        {"type": "text", "text": DETECT},
    ]
    body = {
        "model": "gemini-3.1-flash-lite",
        "input": [{"type": "user_input", "content": items}],
        "generation_config": {"thinking_level": "minimal"},
        "store": False,
    }
    status, interaction = await interact(http, server, body)
    assert status == 200, interaction
    text = interaction["steps"][-1]["content"][0]["text"]
    return json.loads(text.removeprefix("```json\n").removesuffix("\n```"))


# ---------------------------------------------------------------------- the tiers


async def test_a_lite_model_misses_and_slips_at_its_rates_and_a_pro_model_not_at_all(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """On 300 generated objects (seen whole: geometry exact), within ~3 binomial sigmas."""
    exact, simulated = servers
    images = scenes()
    truth = await answers(http, exact, images, LITE, NO_THINKING)
    lite = tally(truth, await answers(http, simulated, images, LITE, NO_THINKING))
    pro = tally(truth, await answers(http, simulated, images, PRO))
    assert lite["objects"] == 2 * SCENES
    tier = PARAMETERS.tiers["lite"]
    missed, slipped = rates(lite)
    assert abs(missed - tier.miss_rate) <= 0.05, missed
    assert abs(slipped - tier.slip_rate) <= 0.06, slipped
    assert set(lite["ious"]) == {1.0}  # a 96-px image is inside the lite model's view
    assert (pro["missed"], pro["slipped"], set(pro["ious"])) == (set(), set(), {1.0})

    thinking = tally(truth, await answers(http, simulated, images, LITE, THINKING))
    assert thinking["missed"] == lite["missed"]  # thinking finds nothing more ...
    expected = tier.slip_rate * PARAMETERS.thinking_slip_factor
    assert thinking["slipped"] < lite["slipped"]  # ... but slips less: a subset of lite's
    assert abs(rates(thinking)[1] - expected) <= 0.05


async def test_a_richer_settings_mistakes_are_a_subset_of_a_poorer_ones(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """The draws are common to every setting: on the same images flash (3% / 5%) misses and
    slips some of the objects lite (10% / 15%) does, and no other."""
    exact, simulated = servers
    images = scenes()
    truth = await answers(http, exact, images, LITE, NO_THINKING)
    lite = tally(truth, await answers(http, simulated, images, LITE, NO_THINKING))
    flash = tally(truth, await answers(http, simulated, images, FLASH, NO_THINKING))
    assert flash["missed"] and flash["missed"] < lite["missed"]
    assert flash["slipped"] - lite["missed"] < lite["slipped"]


async def test_the_bundled_samples_lite_errs_more_than_pro_and_pro_is_exact(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    exact, simulated = servers
    images = samples()
    truth = await answers(http, exact, images, PRO)
    assert await answers(http, simulated, images, PRO) == truth
    lite = tally(truth, await answers(http, simulated, images, LITE, NO_THINKING))
    assert lite["missed"] | lite["slipped"]


def test_tiers_are_read_from_the_model_id() -> None:
    assert [tier_of(m) for m in ("gemini-3.1-flash-lite", "gemini-flash-lite-latest")] == [
        "lite",
        "lite",
    ]
    assert [tier_of(m) for m in ("gemini-3.1-pro-preview", "gemini-9-ultra")] == ["pro", "pro"]
    assert tier_of("gemini-3.8-flash") == "flash"


# -------------------------------------------------------------------- resolution


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


async def test_an_image_sent_smaller_draws_coarser_boxes_and_loses_small_objects(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """A pro model (no misses of its own, a view above the samples' sizes), the samples sent
    whole and at max_side 384, 128, 48: box IoU against the exact answer falls at each step,
    and at 48 px objects fall under the size a model sees."""
    exact, simulated = servers
    images = samples()
    truth = await answers(http, exact, images, PRO)
    tallies = [
        tally(truth, await answers(http, simulated, [shrunk(i, side) for i in images], PRO))
        for side in (384, 128, 48)
    ]
    ious = [1.0] + [mean(t["ious"]) for t in tallies]
    assert ious == sorted(ious, reverse=True) and len(set(ious)) == 4, ious
    assert [t["missed"] for t in tallies[:2]] == [set(), set()]
    tiny = [shrunk(image, 48) for image in images]
    in_the_pixels = tally(truth, await answers(http, exact, tiny, PRO))  # what 48 px still show
    assert tallies[2]["missed"] > in_the_pixels["missed"]


async def test_a_low_media_resolution_draws_coarser_boxes_and_masks(
    servers: tuple[LocalServer, LocalServer], http: aiohttp.ClientSession
) -> None:
    """2.5 Flash at LOW (64 tokens) sees the 512-960 px samples through a ~382-px view: its
    boxes and masks are further from the exact ones than at its default (tiles: the whole image)
    and at MEDIUM (256 tokens: a ~585,000-px view, more than the samples' 518,400 at most)."""
    exact, simulated = servers
    images = [(data, mime) for data, mime in samples() if max(_size(data)) > 400]
    truth = await answers(http, exact, images, FLASH, NO_THINKING, SEGMENT)
    box_ious, mask_ious = [], []
    for config in ({}, {"mediaResolution": "MEDIA_RESOLUTION_MEDIUM"}, LOW):
        got = await answers(http, simulated, images, FLASH, {**NO_THINKING, **config}, SEGMENT)
        boxes, masks = _ious(truth, got, [_size(data) for data, _ in images])
        box_ious.append(boxes)
        mask_ious.append(masks)
    assert box_ious[:2] == mask_ious[:2] == [1.0, 1.0]
    assert box_ious[2] < 0.99 and mask_ious[2] < 0.99, (box_ious, mask_ious)


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def _ious(
    truth: list[list[dict]], got: list[list[dict]], sizes: list[tuple[int, int]]
) -> tuple[float, float]:
    """Mean box IoU and mean mask IoU (full-image masks) of the matched objects."""
    boxes, masks = [], []
    for items, found, (width, height) in zip(truth, got, sizes, strict=True):
        for item in items:
            iou, match = best_match(item, found)
            if iou >= 0.5:
                boxes.append(iou)
                exact_mask = decode_png_mask(item, width, height)
                masks.append(mask_iou(exact_mask, decode_png_mask(match, width, height)))
    return mean(boxes), mean(masks)


# ------------------------------------------------------------------ a run, the rules


async def test_a_run_under_the_simulation_sees_its_setting(tmp_path: Path) -> None:
    """`[local] simulate = "settings"` through a real run: at LOW the rows' masks (RLE in the
    original's pixels) are further from the exact run's than at the default, which equal them."""
    images = tmp_path / "images"
    shutil.copytree(REPO / "data" / "samples", images)
    outputs = {}
    for name, local, task in (
        ("exact", {}, {}),
        ("default", {"simulate": "settings"}, {}),
        ("low", {"simulate": "settings"}, {"media_resolution": "low"}),
    ):
        config = make_config(
            tmp_path,
            api={"model": FLASH},
            local=local,
            task={"kind": "segment", "thinking_budget": 0, **task},
            output={"dir": str(tmp_path / name)},
        )
        summary = await run(config)
        assert summary.exit_code == exits.OK, summary
        outputs[name] = read_current(tmp_path / name)
    scores = {name: _row_mask_ious(outputs["exact"], rows) for name, rows in outputs.items()}
    assert scores["exact"] == scores["default"] == 1.0
    assert scores["low"] < 0.99, scores


def _row_mask_ious(exact: dict[str, dict], rows: dict[str, dict]) -> float:
    """Mean mask IoU of each exact object with the row's object of the same box, where both
    answered it (the flash tier misses some)."""
    ious = []
    for path, row in exact.items():
        for item in row["objects"]:
            scored = [(box_iou(item["bbox"], o["bbox"]), o) for o in rows[path]["objects"]]
            iou, match = max(scored, key=lambda pair: pair[0], default=(0.0, None))
            if iou >= 0.5:
                ious.append(mask_iou(_rle(item["mask"]), _rle(match["mask"])))
    return mean(ious)


def _rle(mask: dict[str, Any]) -> np.ndarray:
    return cocomask.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)


def test_serve_local_rules_list_the_simulation_with_its_parameters() -> None:
    listed = "\n".join(describe_rules())
    entry = listed.split("simulation.settings  [", 1)[1].split("\n\n", 1)[0]
    assert "a simulation" in entry and "assumed: no dated source" in entry
    for tier in PARAMETERS.tiers.values():
        assert f"{tier.miss_rate:.0%} missed, {tier.slip_rate:.0%} of labels slipped" in entry


def test_an_unknown_simulation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="simulate must be one of 'none', 'settings'"):
        ServerOptions(simulate="accuracy")
