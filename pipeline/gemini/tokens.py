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
# tiles (HIGH is "zoomed reframing" at the same 256 as MEDIUM).
GLOBAL_RESOLUTION_TOKENS_2X = {"low": 64, "medium": 256, "high": 256}


def image_tokens(
    model: Model | str, width: int, height: int, media_resolution: str | None = None
) -> int:
    """Tokens one image costs as input under `model`'s rule (`media_resolution` as sent; a model
    id is looked up in the bundled table).

    tiles (2.x): 258 when both sides are <= 384 px, else 258 per tile with unit =
    floor(min(w, h) / 1.5) and tiles = ceil(w / unit) * ceil(h / unit) (960x540 -> unit 360 ->
    3 x 2 tiles -> 1,548); with a media resolution, LOW 64, MEDIUM and HIGH 256 an image.
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
        try:
            return GLOBAL_RESOLUTION_TOKENS_2X[media_resolution]
        except KeyError:
            raise ValueError(f"{media_resolution!r} is not a 2.x media resolution") from None
    if width <= SMALL_IMAGE_SIDE and height <= SMALL_IMAGE_SIDE:
        return TOKENS_PER_TILE
    unit = math.floor(min(width, height) / 1.5)
    if model.tokens == "tiles_1_5":
        unit = min(max(unit, 256), 768)
    unit = max(unit, 1)
    return TOKENS_PER_TILE * math.ceil(width / unit) * math.ceil(height / unit)


def text_tokens(text: str) -> int:
    """Rough count for prompt text: about four bytes of UTF-8 a token, as the guide estimates."""
    return math.ceil(len(text.encode("utf-8")) / 4) if text else 0
