"""`estimate` against the guide's token rules on images of assorted sizes, and the rules alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.commands.estimate import estimate, format_estimate
from pipeline.engines import RunOptions, run_async
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.models import lookup
from pipeline.tasks import get_task
from tests.conftest import make_config, read_rows

# (width, height) -> tokens for 2.0/2.5, worked out by hand from the guide's rule
GUIDE_2X = {
    (384, 384): 258,  # both sides <= 384: flat
    (200, 384): 258,
    (385, 384): 258 * 2 * 2,  # unit floor(384/1.5)=256: ceil(385/256)=2 x ceil(384/256)=2
    (960, 540): 1548,  # the guide's worked example: unit 360, 3 x 2 tiles
    (1000, 1000): 258 * 4,  # unit 666: 2 x 2
    (1920, 1080): 258 * 3 * 2,  # unit 720: ceil(1920/720)=3 x ceil(1080/720)=2
    (4000, 3000): 258 * 2 * 2,  # unit 2000
}


@pytest.mark.parametrize(("size", "tokens"), GUIDE_2X.items())
def test_tile_rule_of_2x(size: tuple[int, int], tokens: int) -> None:
    assert image_tokens("gemini-2.5-flash", *size) == tokens
    assert image_tokens("gemini-2.0-flash", *size) == tokens


def test_rules_by_model() -> None:
    assert lookup("gemini-1.5-pro").tokens == "tiles_1_5"
    assert lookup("models/gemini-2.5-flash-lite").tokens == "tiles"
    assert lookup("gemini-3-flash-preview").tokens == "budget"
    assert lookup("gemini-3.1-pro-preview").tokens == "budget"
    # 1.5: the unit is held between 256 and 768 px
    assert image_tokens("gemini-1.5-flash", 4000, 3000) == 258 * 6 * 4  # unit 768
    assert image_tokens("gemini-1.5-flash", 390, 300) == 258 * 2 * 2  # unit 256
    # 3: a fixed budget per image by media resolution, whatever the size
    for level, budget in {"low": 280, "medium": 560, "high": 1120, "ultra_high": 2240}.items():
        assert image_tokens("gemini-3-flash-preview", 4000, 3000, level) == budget
        assert image_tokens("gemini-3-flash-preview", 100, 100, level) == budget
    assert image_tokens("gemini-3-flash-preview", 100, 100) == 1120
    assert text_tokens("abcd" * 10) == 10


@pytest.mark.parametrize(("level", "tokens"), [("low", 64), ("medium", 256), ("high", 256)])
def test_global_media_resolution_bills_a_flat_charge_on_2x(level: str, tokens: int) -> None:
    """docs/gemini-api.md § Image tokens: LOW 64 tokens an image, MEDIUM 256, HIGH 256 (the
    SDK's "zoomed reframing with 256 tokens"; the section notes pan-and-scan may add more), whatever
    the size — not the tile rule, which would bill a 4000x3000 photo 1,032 tokens."""
    for size in GUIDE_2X:
        assert image_tokens("gemini-2.5-flash", *size, level) == tokens


def test_estimate_adds_up_the_documented_rules(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate(GUIDE_2X):
        Image.new("RGB", (w, h), (i * 30, 100, 200)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    config = make_config(tmp_path, task={"kind": "detect"})
    report = estimate(config)
    assert report["images"] == len(GUIDE_2X)
    assert report["unusable_files"] == 1
    assert report["image_tokens"] == sum(GUIDE_2X.values())
    request = get_task("detect").request(config.task)
    per_prompt = text_tokens((request.system_instruction or "") + request.prompt)
    assert report["prompt_tokens"] == per_prompt * len(GUIDE_2X)
    # gemini-2.5-flash's prices per 1M tokens (docs/gemini-api.md § Prices)
    expected = report["input_tokens"] * 0.30 + report["output_tokens"] * 2.50
    assert report["cost_usd"] == pytest.approx(expected / 1e6, abs=1e-4)
    assert report["batch_cost_usd"] == pytest.approx(expected / 2e6, abs=1e-4)  # half price
    # downscaling to 384 px would make every image one flat 258-token tile
    by_side = {s["max_side"]: s for s in report["savings"] if "max_side" in s}
    assert by_side[384]["image_tokens_saved"] == sum(GUIDE_2X.values()) - 258 * len(GUIDE_2X)
    assert "1,548" in format_estimate(
        estimate(
            make_config(tmp_path, input={"paths": [str(images / "3.png")]}, task={"kind": "detect"})
        )
    )


def test_estimate_gemini_3_and_time_at_limits(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (800, 600), (i * 40, 0, 0)).save(images / f"{i}.png")
    config = make_config(
        tmp_path,
        api={"model": "gemini-3-flash-preview"},
        task={"kind": "caption"},
        limits={"rpm": 3, "tpm": 1_000_000, "rpd": 4},
    )
    report = estimate(config)
    assert report["image_tokens"] == 6 * 1120
    assert report["minutes_at_limits"] == 2.0  # 6 requests at 3 a minute
    assert report["days_at_rpd"] == 2
    levels = {s["media_resolution"]: s["image_tokens_saved"] for s in report["savings"]}
    assert levels == {"low": 6 * 840, "medium": 6 * 560}
    assert report["image_tokens_are_maxima"]
    text = format_estimate(report)
    assert "images at most 6,720" in text  # Gemini 3's budgets are documented maxima
    json.dumps(report)  # --json works


def test_estimate_reads_headers_and_exif_only(tmp_path: Path) -> None:
    """A JPEG rotated by EXIF is counted at its displayed size, a header that lies about a huge
    size is not decoded (the bomb guard stays on), and a truncated body does not matter."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 1000x400, displayed 400x1000
    Image.new("RGB", (1000, 400), (9, 9, 9)).save(images / "rotated.jpg", exif=exif.tobytes())
    whole = (images / "rotated.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # header intact, pixels cut
    config = make_config(tmp_path, task={"kind": "detect"}, images={"max_side": 500})
    report = estimate(config)
    assert report["images"] == 2
    per_image = image_tokens("gemini-2.5-flash", 200, 500)  # displayed 400x1000 fit to 500
    assert report["image_tokens"] == 2 * per_image


def test_estimate_learns_output_tokens_from_earlier_rows(tmp_path: Path) -> None:
    import asyncio

    from pipeline.engines import RunOptions, run_async

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (300, 300), (255, 255, 255)).save(images / "a.png")
    config = make_config(tmp_path, task={"kind": "caption"})
    asyncio.run(run_async(config, RunOptions(progress=False)))
    report = estimate(config)
    assert report["output_tokens_from"] == "1 earlier rows"


async def test_the_estimate_is_what_a_run_estimates_each_request_at(tmp_path: Path) -> None:
    """One calculation (pipeline/run/costing.py) for `estimate`, the interactive caller and
    Batch Mode: the estimate's input tokens are the sum of the rows' `est_prompt_tokens`, its
    image tokens (the references' included) the sum of their `est_image_tokens`."""
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(200, 384), (385, 384), (960, 540)]):
        Image.new("RGB", (w, h), (i * 60, 90, 30)).save(images / f"{i}.png")
    Image.new("RGB", (120, 90), (9, 200, 9)).save(tmp_path / "ref.png")
    task = {"kind": "detect", "reference_images": [{"image": "ref.png", "caption": "an example"}]}
    report = estimate(make_config(tmp_path, task=task))
    assert report["reference_tokens"] == 3 * 258
    batch = {
        "api": {"mode": "batch"},
        "local": {"batch_seconds": 0.1},
        "batch": {"poll_seconds": 0.02},
    }
    for name, mode in (("interactive", {}), ("batch", batch)):
        config = make_config(tmp_path, task=task, output={"dir": str(tmp_path / name)}, **mode)
        summary = await run_async(config, RunOptions(progress=False))
        assert dict(summary.rows) == {"ok": 3}, name
        rows = read_rows(tmp_path / name)
        assert report["input_tokens"] == sum(row["est_prompt_tokens"] for row in rows), name
        images_estimated = report["image_tokens"] + report["reference_tokens"]
        assert images_estimated == sum(row["est_image_tokens"] for row in rows), name
