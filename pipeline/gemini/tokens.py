"""Image and text token rules of the Gemini model families (the image-understanding guide).

Used twice on purpose: the pipeline estimates a request's cost before sending it, and the local
server bills by the very same rules, so estimates and "billed" usage can be compared. Which rule
a model follows is the model table's `tokens` field (pipeline/models.py).
"""

from __future__ import annotations

import math

from pipeline.models import Model, lookup

TOKENS_PER_TILE = 258
SMALL_IMAGE_SIDE = 384  # both sides <= this: one flat charge of 258 tokens
# Gemini 3: the documented *maximum* an image may cost at each media resolution.
MEDIA_RESOLUTION_TOKENS = {"low": 280, "medium": 560, "high": 1120, "ultra_high": 2240}
DEFAULT_MEDIA_RESOLUTION = "high"
# 2.x with the global generationConfig.mediaResolution: a flat charge per image instead of
# tiles: LOW 64, MEDIUM 256, and HIGH "256 + Pan & Scan" (the media-resolution page, 2026-09-19:
# pan-and-scan crops add tokens, ~2,048 at most), so HIGH's 256 here is before its crops.
GLOBAL_RESOLUTION_TOKENS_2X = {"low": 64, "medium": 256, "high": 256}
PAN_AND_SCAN_LEVEL = "high"
# Pan & Scan, as this project assumes it (no page says how Gemini cuts; rule
# billing.pan-and-scan in pipeline/localserver/rules.py): the idea of Gemma 3's Pan & Scan (its
# technical report; transformers' Gemma3ImageProcessor) — an image whose long side is at least
# 1.2 times its short side is cut along the long side into round(long / short) crops, at least 2,
# none under 256 px a side — with at most 8 crops of 256 tokens, the page's "~2,048" more.
PAN_AND_SCAN_CROP_TOKENS = 256
PAN_AND_SCAN_MAX_CROPS = 8
PAN_AND_SCAN_MIN_RATIO = 1.2
PAN_AND_SCAN_MIN_CROP_SIDE = 256


def image_tokens(
    model: Model | str, width: int, height: int, media_resolution: str | None = None
) -> int:
    """Tokens one image costs as input under `model`'s rule (`media_resolution` as sent; a model
    id is looked up in the bundled table).

    tiles (2.x): 258 when both sides are <= 384 px, else 258 per tile with unit =
    floor(min(w, h) / 1.5) and tiles = ceil(w / unit) * ceil(h / unit) (960x540 -> unit 360 ->
    3 x 2 tiles -> 1,548); with a media resolution, LOW 64, MEDIUM 256 an image, HIGH 256 plus
    256 a pan-and-scan crop (`pan_and_scan_crops`: an assumption within the documented range,
    see `image_token_range`).
    tiles_1_5: the same tiles with the unit held between 256 and 768 px. budget (Gemini 3): at
    most low 280, medium 560, high 1,120 (the default), ultra high 2,240.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if isinstance(model, str):
        model = lookup(model)
    if model.tokens == "budget":
        level = media_resolution or DEFAULT_MEDIA_RESOLUTION
        try:
            return MEDIA_RESOLUTION_TOKENS[level]
        except KeyError:
            raise ValueError(f"unknown media resolution {level!r}") from None
    if media_resolution is not None and model.tokens == "tiles":
        crops = pan_and_scan_crops(width, height) if media_resolution == PAN_AND_SCAN_LEVEL else 0
        return _global_2x(media_resolution) + PAN_AND_SCAN_CROP_TOKENS * crops
    if width <= SMALL_IMAGE_SIDE and height <= SMALL_IMAGE_SIDE:
        return TOKENS_PER_TILE
    unit = math.floor(min(width, height) / 1.5)
    if model.tokens == "tiles_1_5":
        unit = min(max(unit, 256), 768)
    unit = max(unit, 1)
    return TOKENS_PER_TILE * math.ceil(width / unit) * math.ceil(height / unit)


def image_token_range(
    model: Model | str, width: int, height: int, media_resolution: str | None = None
) -> tuple[int, int]:
    """(fewest, most) tokens the service may bill one image. The two are `image_tokens` where
    the documented rule is exact (Gemini 3's budgets are maxima: `estimate` says "at most");
    2.x at HIGH is 256 plus pan-and-scan crops the page bounds (~2,048) but does not define, so
    256 to 2,304 whatever our own count of crops says."""
    if isinstance(model, str):
        model = lookup(model)
    if model.tokens == "tiles" and media_resolution == PAN_AND_SCAN_LEVEL:
        base = _global_2x(media_resolution)
        return base, base + PAN_AND_SCAN_CROP_TOKENS * PAN_AND_SCAN_MAX_CROPS
    tokens = image_tokens(model, width, height, media_resolution)
    return tokens, tokens


def pan_and_scan_crops(width: int, height: int) -> int:
    """The crops this project assumes 2.x's HIGH adds to an image (see PAN_AND_SCAN_* above):
    0 for a near-square or small image, else 2 to 8 along its long side."""
    long, short = max(width, height), min(width, height)
    if long < PAN_AND_SCAN_MIN_RATIO * short:
        return 0
    crops = min(math.floor(long / short + 0.5), long // PAN_AND_SCAN_MIN_CROP_SIDE)
    crops = min(max(crops, 2), PAN_AND_SCAN_MAX_CROPS)
    if min(math.ceil(long / crops), short) < PAN_AND_SCAN_MIN_CROP_SIDE:
        return 0
    return crops


def _global_2x(media_resolution: str) -> int:
    try:
        return GLOBAL_RESOLUTION_TOKENS_2X[media_resolution]
    except KeyError:
        raise ValueError(f"{media_resolution!r} is not a 2.x media resolution") from None


def text_tokens(text: str) -> int:
    """Rough count for prompt text: about four bytes of UTF-8 a token, as the guide estimates."""
    return math.ceil(len(text.encode("utf-8")) / 4) if text else 0
