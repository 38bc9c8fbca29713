"""Image and text token rules of the Gemini model families (the image-understanding guide).

Used twice on purpose: the pipeline estimates a request's cost before sending it, and the local
server bills by the very same rules, so estimates and "billed" usage can be compared.
"""

from __future__ import annotations

import math
import re
from typing import Literal

Family = Literal["1.5", "2", "3"]

TOKENS_PER_TILE = 258
SMALL_IMAGE_SIDE = 384  # both sides <= this: one flat charge of 258 tokens
MEDIA_RESOLUTION_TOKENS = {"low": 280, "medium": 560, "high": 1120, "ultra_high": 2240}
DEFAULT_MEDIA_RESOLUTION = "high"

_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def model_family(model: str) -> Family:
    """Which token rules apply: "1.5", "2" (2.0 / 2.5) or "3" (3.x); unknown names get "2"."""
    match = _VERSION.search(model.lower().removeprefix("models/"))
    if not match:
        return "2"
    major = int(match.group(1))
    if major >= 3:
        return "3"
    if major == 1:
        return "1.5"
    return "2"


def image_tokens(model: str, width: int, height: int, media_resolution: str | None = None) -> int:
    """Tokens one image costs as input.

    2.x: 258 when both sides are <= 384 px, else 258 per tile with unit = floor(min(w, h) / 1.5)
    and tiles = ceil(w / unit) * ceil(h / unit) (960x540 -> unit 360 -> 3 x 2 tiles -> 1,548).
    1.5: the same with the unit held between 256 and 768 px. 3: a fixed budget per image by
    media resolution (low 280, medium 560, high 1,120 by default, ultra high 2,240).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    family = model_family(model)
    if family == "3":
        level = media_resolution or DEFAULT_MEDIA_RESOLUTION
        try:
            return MEDIA_RESOLUTION_TOKENS[level]
        except KeyError:
            raise ValueError(f"unknown media resolution {level!r}") from None
    if width <= SMALL_IMAGE_SIDE and height <= SMALL_IMAGE_SIDE:
        return TOKENS_PER_TILE
    unit = math.floor(min(width, height) / 1.5)
    if family == "1.5":
        unit = min(max(unit, 256), 768)
    unit = max(unit, 1)
    return TOKENS_PER_TILE * math.ceil(width / unit) * math.ceil(height / unit)


def text_tokens(text: str) -> int:
    """Rough count for prompt text: about four bytes of UTF-8 a token, as the guide estimates."""
    return math.ceil(len(text.encode("utf-8")) / 4) if text else 0
