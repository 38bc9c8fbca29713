"""The `settings` simulation (rule simulation.settings): answers that degrade with the setting.

Without it the local model answers every setting alike: it reads pixels, so only an image sent
smaller changes its answer, and by less than a real model's would. `compare` and `tune` (issue 23)
need settings that differ in a known way, so under `--simulate settings` (`[local] simulate =
"settings"`) each image's analysis (vision.py) is degraded before answers.py writes the answer,
the way a real model loses what its setting withholds:

- **Resolution** decides geometry. A model sees an image through its tokens: one token carries
  the detail of a `patch_side_px` square (47.8 px: 2.x's 768-px tile is 258 tokens), so an
  image billed T tokens (pipeline/gemini/tokens.py, the bill's own rule) is seen at most at
  T x 47.8^2 pixels, and never above the size it was sent at. Where that view is coarser than the
  image, box edges are jittered by up to `edge_jitter_cells` of a view pixel and snapped to the
  view's grid, and masks are resampled through the view (outlines coarsen in proportion). An
  object whose shorter side in view pixels is under `missed_below_px` is missed, above
  `seen_above_px` never for its size, linearly in between. 2.x at LOW (64 tokens) sees a
  382-px square; Gemini 3 at HIGH (1,120) a 1,600-px one; a `max_side` shrinks what is sent.
- **Tier** decides recognition: a model id containing "lite" misses `miss_rate` of the objects
  and slips `slip_rate` of the labels it gives; "pro" (or "ultra") misses and slips none; any
  other is "flash". A slip swaps one word: the colour for a neighbour on the hue wheel
  (`COLOUR_NEIGHBOURS`) or the shape for the one vision.py tells it apart from by fill ratio
  (`SHAPE_NEIGHBOURS`).
- **Thinking**: a turn that thinks (model_checks.thinks: not budget 0, not level minimal) slips
  `thinking_slip_factor` as often; how much it thinks does not matter.

So the richest setting, a pro model seeing the image whole, answers exactly what the server
answers without the simulation (objects under `seen_above_px` aside: no model sees a speck): the
reference `tune` compares the others with. An image sent smaller (`max_side`) is seen no finer
than it was sent: vision.py finds coarser boxes in its fewer pixels, and small objects are
missed by the size they have in it.

Why a switch, off by default: the tests, the demo and the benchmarks assert exact geometry and
labels with flash models and every setting; the simulation is for runs that measure settings
(`tune`'s, and tests of it), which turn it on. Why the draws are common to every setting: each
object's draws are seeded by the server's `--seed`, the image's bytes (sha256) and the object's
place in the analysis (largest first), never by the model, time or call order, and a setting
decides what they mean (an object is missed when its draw is under the setting's miss chance).
So the same request always gets the same answer, and a richer setting's mistakes are a subset of
a poorer one's on the same image: comparisons measure the settings, not the luck of the draw.

The rates are the double's choice, not measurements: they say nothing of the real models.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from pipeline.gemini.tokens import TOKENS_PER_TILE, image_tokens
from pipeline.localserver.vision import Analysis, Region
from pipeline.models import Model

TILE_SIDE_PX = 768  # 2.x's crop, billed TOKENS_PER_TILE (258): one token, a 47.8-px square


@dataclass(frozen=True, slots=True)
class Tier:
    """What a model tier gets wrong whatever it sees."""

    miss_rate: float  # share of the objects it leaves out
    slip_rate: float  # share of the labels it gives with one word wrong


@dataclass(frozen=True, slots=True)
class Parameters:
    """The whole simulation in one place (the module docstring says what each does)."""

    patch_side_px: float = TILE_SIDE_PX / math.sqrt(TOKENS_PER_TILE)  # 47.8 px
    edge_jitter_cells: float = 0.5  # view pixels a box edge may move before it snaps
    missed_below_px: float = 4.0  # shorter side in view pixels: always missed below ...
    seen_above_px: float = 10.0  # ... never missed for its size above
    thinking_slip_factor: float = 0.5
    tiers: dict[str, Tier] = field(
        default_factory=lambda: {
            "pro": Tier(miss_rate=0.0, slip_rate=0.0),
            "flash": Tier(miss_rate=0.03, slip_rate=0.05),
            "lite": Tier(miss_rate=0.10, slip_rate=0.15),
        }
    )


PARAMETERS = Parameters()

# each colour's neighbours on the hue wheel (the achromatic ones by lightness), as vision.py
# names them: the word a model unsure of the hue says instead
COLOUR_NEIGHBOURS = {
    "red": ("orange", "magenta"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "green"),
    "green": ("yellow", "cyan"),
    "cyan": ("green", "blue"),
    "blue": ("cyan", "purple"),
    "purple": ("blue", "magenta"),
    "magenta": ("purple", "red"),
    "pink": ("red", "magenta"),
    "brown": ("orange", "red"),
    "white": ("gray",),
    "gray": ("white", "black"),
    "black": ("gray",),
}
# vision.py tells shapes apart by how much of their box they fill (rectangle > 0.9 > circle >
# 0.62 > triangle): each is confused with its neighbours on that scale
SHAPE_NEIGHBOURS = {
    "rectangle": ("circle",),
    "circle": ("rectangle", "triangle"),
    "triangle": ("circle",),
}


def tier_of(model: str) -> str:
    """The tier a model id names: "lite", "pro" (or "ultra"), else "flash"."""
    name = model.lower()
    if "lite" in name:
        return "lite"
    return "pro" if "pro" in name or "ultra" in name else "flash"


@dataclass(frozen=True, slots=True)
class Setting:
    """What a request sets that the simulation reads (per image, its own media resolution
    overrides the request's)."""

    model: str  # the id as requested: its tier
    spec: Model | str  # the table entry: its token rule
    media_resolution: str | None
    thinking: bool


@dataclass(frozen=True, slots=True)
class View:
    """How one image is seen under one setting."""

    tier: Tier
    scale: float  # the view's side over the side as sent, at most 1
    thinking: bool
    seed: bytes  # the server's seed and the image's sha256: every object's draws


class Simulation:
    """Degrades analyses by setting; built once per server from its --seed."""

    def __init__(self, seed: int, parameters: Parameters = PARAMETERS) -> None:
        self.seed = seed
        self.parameters = parameters

    def view(
        self, setting: Setting, analysis: Analysis, sha256: str, resolution: str | None
    ) -> View:
        """How the image of `analysis` (bytes `sha256`, its own media resolution or None) is
        seen under `setting`."""
        tokens = image_tokens(
            setting.spec, analysis.width, analysis.height, resolution or setting.media_resolution
        )
        seen = tokens * self.parameters.patch_side_px**2
        scale = min(1.0, math.sqrt(seen / (analysis.width * analysis.height)))
        tier = self.parameters.tiers[tier_of(setting.model)]
        digest = hashlib.sha256(f"{self.seed}:{sha256}".encode()).digest()
        return View(tier, scale, setting.thinking, digest)

    def degrade(self, analysis: Analysis, view: View) -> Analysis:
        """The analysis as `view` sees it: objects missed, labels slipped, geometry coarsened."""
        cells = _cells(analysis, view.scale)
        offsets = _draws(view.seed, -1, 2) * np.array(cells)  # where the view's grid lies
        kept = []
        for index, region in enumerate(analysis.regions):
            draws = _draws(view.seed, index, 8)
            if draws[0] < self._miss_chance(region, view, cells):
                continue
            region = self._slipped(region, view, draws[1:4])
            kept.append(_coarsened(analysis, region, cells, offsets, self._jitter(draws[4:])))
        return replace(analysis, regions=kept)

    def _miss_chance(self, region: Region, view: View, cells: tuple[float, float]) -> float:
        """The tier's misses, and small objects' (by their shorter side in view pixels)."""
        side = min((region.y1 - region.y0) / cells[0], (region.x1 - region.x0) / cells[1])
        low, high = self.parameters.missed_below_px, self.parameters.seen_above_px
        small = min(max((high - side) / (high - low), 0.0), 1.0)
        return 1.0 - (1.0 - view.tier.miss_rate) * (1.0 - small)

    def _slipped(self, region: Region, view: View, draws: np.ndarray) -> Region:
        """`region` with its colour or shape word swapped, at the tier's slip rate."""
        rate = view.tier.slip_rate
        if view.thinking:
            rate *= self.parameters.thinking_slip_factor
        if draws[0] >= rate:
            return region
        if draws[1] < 0.5:
            colour = _pick(COLOUR_NEIGHBOURS.get(region.colour, ()), draws[2], region.colour)
            return _copy(region, colour=colour)
        shapes = SHAPE_NEIGHBOURS.get(region.shape, ())
        return _copy(region, shape=_pick(shapes, draws[2], region.shape))

    def _jitter(self, draws: np.ndarray) -> np.ndarray:
        """Each edge's move in view pixels (y0, x0, y1, x1), within +-edge_jitter_cells."""
        return (draws * 2.0 - 1.0) * self.parameters.edge_jitter_cells


def _draws(seed: bytes, index: int, count: int) -> np.ndarray:
    """`count` uniform draws in [0, 1) of object `index` (-1: the image's own)."""
    key = hashlib.sha256(seed + index.to_bytes(8, "big", signed=True)).digest()
    return np.random.default_rng(int.from_bytes(key[:16], "big")).random(count)


def _cells(analysis: Analysis, scale: float) -> tuple[float, float]:
    """Analysis pixels per view pixel, (y, x): above 1 where the view is coarser."""
    return (
        analysis.analysis_height / (analysis.height * scale),
        analysis.analysis_width / (analysis.width * scale),
    )


def _pick(choices: tuple[str, ...], draw: float, same: str) -> str:
    return choices[int(draw * len(choices))] if choices else same


def _copy(region: Region, **changes: Any) -> Region:
    """A new region (its own cache of rendered masks): the analysis cache's stays as it was."""
    return replace(region, rendered={}, **changes)


def _coarsened(
    analysis: Analysis,
    region: Region,
    cells: tuple[float, float],
    offsets: np.ndarray,
    jitter: np.ndarray,
) -> Region:
    """`region`'s box and mask as a view `cells` analysis pixels a pixel draws them."""
    if max(cells) <= 1.0:
        return region
    limits = (analysis.analysis_height, analysis.analysis_width)
    edges = (region.y0, region.x0, region.y1, region.x1)
    y0, x0, y1, x1 = (
        _edge(edge, cells[i % 2], offsets[i % 2], jitter[i], limits[i % 2])
        for i, edge in enumerate(edges)
    )
    y0, y1 = _apart(y0, y1, limits[0])
    x0, x1 = _apart(x0, x1, limits[1])
    coverage = _resampled(region.coverage, cells, (x1 - x0, y1 - y0))
    mask = coverage > 127
    if not mask.any():  # a model always draws something inside the box it gives
        mask = coverage == coverage.max()
    area = int(mask.sum())
    return _copy(region, y0=y0, x0=x0, y1=y1, x1=x1, area=area, mask=mask, coverage=coverage)


def _edge(edge: int, cell: float, offset: float, jitter: float, limit: int) -> int:
    """An edge moved by `jitter` view pixels and snapped to the view's grid, in analysis pixels."""
    snapped = round((edge + jitter * cell - offset) / cell) * cell + offset
    return min(max(round(snapped), 0), limit)


def _apart(low: int, high: int, limit: int) -> tuple[int, int]:
    """Edges at least a pixel apart, inside [0, limit]."""
    if high > low:
        return low, high
    high = min(low + 1, limit)
    return high - 1, high


def _resampled(
    coverage: np.ndarray, cells: tuple[float, float], size: tuple[int, int]
) -> np.ndarray:
    """The coverage map through the view (box filter down) and back at `size` (bilinear)."""
    height, width = coverage.shape
    seen = (max(1, round(width / cells[1])), max(1, round(height / cells[0])))
    image = Image.fromarray(coverage).resize(seen, Image.Resampling.BOX)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def describe(parameters: Parameters = PARAMETERS) -> str:
    """The simulation and its parameters in a paragraph, as `serve-local --rules` lists it."""
    tiers = "; ".join(
        f"{name}: {tier.miss_rate:.0%} missed, {tier.slip_rate:.0%} of labels slipped"
        for name, tier in parameters.tiers.items()
    )
    return (
        "--simulate settings (a simulation, off by default): answers degrade, seeded by the "
        "image's bytes and --seed, with what the request's setting would lose. A token carries "
        f"a {parameters.patch_side_px:.1f}-px square, so an image billed T tokens is seen at "
        f"most at T x {parameters.patch_side_px:.1f}^2 pixels and never above its size as sent; "
        "where that view is coarser, box edges move up to "
        f"{parameters.edge_jitter_cells} view px and snap to its grid, masks are resampled "
        f"through it, and objects under {parameters.missed_below_px:g} view px a side are "
        f"missed (none over {parameters.seen_above_px:g}, linearly between). Tiers by model "
        f'id ("lite", "pro"/"ultra", else flash): {tiers}; a turn that thinks slips '
        f"{parameters.thinking_slip_factor:g} as often. The rates are the double's choice, "
        "not measurements of the real models."
    )
