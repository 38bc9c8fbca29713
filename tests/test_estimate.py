"""`estimate` against the guide's token rules on images of assorted sizes, and the rules alone."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from PIL import Image

from pipeline.commands.estimate import estimate, format_estimate
from pipeline.engines import RunOptions, run_async
from pipeline.gemini.tokens import image_token_range, image_tokens, text_tokens
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


@pytest.mark.parametrize(("level", "tokens"), [("low", 64), ("medium", 256)])
def test_global_media_resolution_bills_a_flat_charge_on_2x(level: str, tokens: int) -> None:
    """docs/gemini-api.md § Image tokens: LOW 64 tokens an image, MEDIUM 256, whatever the size —
    not the tile rule, which would bill a 4000x3000 photo 1,032 tokens."""
    for size in GUIDE_2X:
        assert image_tokens("gemini-2.5-flash", *size, level) == tokens
        assert image_token_range("gemini-2.5-flash", *size, level) == (tokens, tokens)


# (width, height) -> pan-and-scan crops of the assumed rule (pipeline/gemini/tokens.py)
PAN_AND_SCAN = {
    (384, 384): 0,  # square
    (96, 80): 0,  # ratio 1.2, but crops would be under 256 px
    (1100, 1000): 0,  # ratio 1.1: under 1.2
    (960, 540): 2,  # ratio 1.78 -> 2
    (4000, 3000): 2,  # ratio 1.33 rounds to 1, at least 2
    (1600, 400): 4,  # ratio 4 -> 4 crops of 400 px
    (600, 3000): 5,  # portrait: along the height
    (5000, 500): 8,  # ratio 10: held to 8
    (1200, 200): 0,  # the short side is under 256 px: no crop can be
}


@pytest.mark.parametrize(("size", "crops"), PAN_AND_SCAN.items())
def test_high_on_2x_is_256_plus_pan_and_scan_crops(size: tuple[int, int], crops: int) -> None:
    """HIGH on 2.x is "256 + Pan & Scan" (the media-resolution page, 2026-09-19: up to ~2,048
    more), not a flat 256: 256 a crop by the project's assumed rule, always within the range
    256 to 2,304 that `estimate` states."""
    assert image_tokens("gemini-2.5-flash", *size, "high") == 256 + 256 * crops
    assert image_token_range("gemini-2.5-flash", *size, "high") == (256, 2304)


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


def test_estimate_of_2_5_flash_at_high_is_a_range(tmp_path: Path) -> None:
    """2.5 Flash with media_resolution high: 256 to ~2,304 tokens an image, so the input and the
    cost are ranges (each request's images at 256, and at 2,304); the figure between is the
    assumed pan-and-scan count, which a run estimates its requests at and the local server
    bills."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(384, 384), (1600, 400), (5000, 500)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 60, 90, 30)).save(images / f"{i}.png")
    config = make_config(tmp_path, task={"kind": "caption", "media_resolution": "high"})
    report = estimate(config, on=date(2026, 12, 6))
    assert report["tokens_an_image_range"] == [256, 2304]
    assert report["image_tokens"] == 256 + 1280 + 2304
    text_tokens_total = report["input_tokens"] - report["image_tokens"]
    low, high = report["input_tokens_range"]
    assert (low, high) == (text_tokens_total + 3 * 256, text_tokens_total + 3 * 2304)
    output = report["output_tokens"]
    for key, (rate_in, rate_out) in (("cost_usd", (0.30, 2.50)), ("batch_cost_usd", (0.15, 1.25))):
        cheapest, dearest = report[f"{key}_range"]
        assert cheapest == pytest.approx((low * rate_in + output * rate_out) / 1e6, abs=1e-4)
        assert dearest == pytest.approx((high * rate_in + output * rate_out) / 1e6, abs=1e-4)
        assert cheapest <= report[key] <= dearest
    text = format_estimate(report)
    assert "256 to ~2,304 tokens an image" in text
    assert f"({low:,} to ~{high:,})" in text
    assert f"~${report['cost_usd']:,.2f} (${report['cost_usd_range'][0]:,.2f} to ~$" in text
    # medium is a flat 256: what choosing it would save, by the assumed count
    levels = {s["media_resolution"]: s["image_tokens_saved"] for s in report["savings"]}
    assert levels["medium"] == 1024 + 2048 and levels["low"] == 3 * 256 + 1024 + 2048 - 3 * 64


async def test_the_local_server_bills_high_on_2x_as_the_estimate_counts(tmp_path: Path) -> None:
    """A run at HIGH: each row's billed prompt is its estimate (the same assumed crops), within
    the estimate's range."""
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(1600, 400), (400, 400)]):
        Image.new("RGB", size, (i * 60, 90, 30)).save(images / f"{i}.png")
    config = make_config(tmp_path, task={"kind": "caption", "media_resolution": "high"})
    report = estimate(config)
    summary = await run_async(config, RunOptions(progress=False))
    assert dict(summary.rows) == {"ok": 2}
    rows = read_rows(tmp_path / "out")
    assert sorted(row["est_image_tokens"] for row in rows) == [256, 1280]
    for row in rows:
        assert row["prompt_tokens"] == row["est_prompt_tokens"]
    low, high = report["input_tokens_range"]
    assert low <= sum(row["prompt_tokens"] for row in rows) <= high


def test_estimate_bills_each_request_at_its_own_prompt_tier(tmp_path: Path) -> None:
    """3.1 Pro: a group of 180 images (180 x 1,120 tokens) passes 200k prompt tokens and is
    billed wholly at 4.00 / 18.00; a group of two stays at 2.00 / 12.00 — in the same run, not
    the run's total at one tier."""
    images = tmp_path / "images"
    for name, count in (("big", 180), ("small", 2)):
        (images / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i % 250, 0, 0)).save(images / name / f"{i:03d}.png")
    model = {"model": "gemini-3.1-pro-preview"}

    def report_of(path: Path) -> dict:
        config = make_config(
            tmp_path,
            api=model,
            input={"paths": [str(path)], "group_by": "folder"},
            task={"kind": "detect"},
        )
        return estimate(config, on=date(2026, 12, 6))

    both, big, small = (report_of(p) for p in (images, images / "big", images / "small"))
    assert big["input_tokens"] > 200_000 > small["input_tokens"]
    assert both["requests"] == 2 and both["requests_long_prompt"] == 1
    expected = (
        big["input_tokens"] * 4.00 + big["output_tokens"] * 18.00
        + small["input_tokens"] * 2.00 + small["output_tokens"] * 12.00
    ) / 1e6  # fmt: skip
    assert both["cost_usd"] == pytest.approx(expected, abs=1e-4)
    assert both["batch_cost_usd"] == pytest.approx(expected / 2, abs=1e-4)
    assert "1 request over 200,000 prompt tokens" in format_estimate(both)


@pytest.mark.parametrize("model", ["gemini-3.6-flash", "gemini-3.7-flash", "gemini-3.8-flash"])
def test_estimate_gives_the_next_periods_cost_when_todays_price_ends_soon(
    tmp_path: Path, model: str
) -> None:
    """Today's price is the estimate's; 0.75 / 3.75 ends on 2026-12-31, so an estimate within 30
    days of that also says what the run costs from 2027-01-01 (1.50 / 7.50: twice as much)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (500, 400), (i * 90, 0, 0)).save(images / f"{i}.png")
    config = make_config(tmp_path, api={"model": model}, task={"kind": "detect"})
    report = estimate(config, on=date(2026, 12, 20))
    assert report["price_per_million"]["input"] == 0.75
    assert report["price_per_million"]["until"] == "2026-12-31"
    following = report["next_price"]
    assert following["from"] == "2027-01-01"
    assert following["price_per_million"]["input"] == 1.50
    expected = (report["input_tokens"] * 0.75 + report["output_tokens"] * 3.75) / 1e6
    assert report["cost_usd"] == pytest.approx(expected, abs=1e-4)
    assert report["batch_cost_usd"] == pytest.approx(expected / 2, abs=1e-4)
    assert following["cost_usd"] == pytest.approx(2 * expected, abs=1e-4)
    assert following["batch_cost_usd"] == pytest.approx(expected, abs=1e-4)
    text = format_estimate(report)
    assert f"from 2027-01-01 the same run costs ~${following['cost_usd']:,.2f}" in text
    assert estimate(config, on=date(2026, 11, 1))["next_price"] is None  # 60 days away
    after = estimate(config, on=date(2027, 1, 1))
    assert after["price_per_million"]["input"] == 1.50 and after["next_price"] is None
