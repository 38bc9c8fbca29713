"""`pipeline estimate`: what a run would cost in tokens, money and time, without one API call.

Image tokens follow the model's documented rule (the model table's `tokens`, computed by
pipeline.gemini.tokens, the same rules the local server bills by) from each image's header and
EXIF alone; Gemini 3's per-image figures are documented maxima, so those totals are "at most".
Output tokens come from earlier rows of the same task in the output directory when there are
some, else from a per-task guess. Prices come from the model table (interactive and Batch Mode
side by side). Alongside, what downscaling (`max_side`) or a lower media resolution would save.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import images
from pipeline.config import Config
from pipeline.dataset import part_files
from pipeline.gemini.tokens import (
    GLOBAL_RESOLUTION_TOKENS_2X,
    MEDIA_RESOLUTION_TOKENS,
    image_tokens,
    text_tokens,
)
from pipeline.models import Model, Price
from pipeline.records import SourceFile
from pipeline.source import input_sources
from pipeline.tasks import get_task

# Output tokens per image when there is no history to learn from: masks are long, labels short.
OUTPUT_GUESS = {"detect": 250, "segment": 2500, "caption": 60, "classify": 8, "custom": 200}
MAX_SIDE_CHOICES = (384, 768, 1024, 1536)


def _scaled(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _output_history(output_dir: str, task: str) -> tuple[int, float] | None:
    """(rows, mean billed output+thought tokens) of earlier ok rows of this task, if any."""
    parts = part_files(output_dir)
    if not parts:
        return None
    table = ds.dataset([str(p) for p in parts], format="parquet").to_table(
        columns=["output_tokens", "thoughts_tokens"],
        filter=(pc.field("task") == task) & (pc.field("status") == "ok"),
    )
    if table.num_rows == 0:
        return None
    out = pc.sum(pc.fill_null(table["output_tokens"], 0)).as_py() or 0
    thought = pc.sum(pc.fill_null(table["thoughts_tokens"], 0)).as_py() or 0
    return table.num_rows, (out + thought) / table.num_rows


def estimate(config: Config, *, limit: int | None = None) -> dict[str, Any]:
    """Walk the inputs like a run would (headers only) and add up the costs."""
    spec = config.task.spec
    request = get_task(config.task.kind).request(config.task)
    prompt_tokens = text_tokens((request.system_instruction or "") + request.prompt)
    sizes, unusable = _sizes(config, limit)
    resolution = request.media_resolution
    image_total = sum(image_tokens(spec, w, h, resolution) for w, h in sizes)
    found = len(sizes)
    history = _output_history(config.output.dir, config.task.kind)
    per_image_output = history[1] if history else OUTPUT_GUESS[config.task.kind]
    input_total = image_total + prompt_tokens * found
    output_total = round(per_image_output * found)
    price = spec.price()
    savings = _savings(spec, sizes, resolution, image_total)
    for saving in savings:
        saving["usd_saved"] = (
            round(price.cost(saving["image_tokens_saved"], 0), 4) if price else None
        )
    return {
        "model": config.api.model,
        "model_entry": spec.name,
        "token_rule": spec.tokens,
        "image_tokens_are_maxima": spec.tokens == "budget",
        "task": config.task.kind,
        "images": found,
        "unusable_files": unusable,
        "image_tokens": image_total,
        "prompt_tokens": prompt_tokens * found,
        "input_tokens": input_total,
        "output_tokens": output_total,
        "output_tokens_per_image": round(per_image_output, 1),
        "output_tokens_from": f"{history[0]} earlier rows" if history else "per-task guess",
        "price_per_million": _price_dict(price),
        "cost_usd": _cost(price, input_total, output_total, batch=False),
        "batch_cost_usd": _cost(price, input_total, output_total, batch=True),
        **_time(config, found, input_total),
        "savings": savings,
    }


def _sizes(config: Config, limit: int | None) -> tuple[list[tuple[int, int]], int]:
    """(sent width, sent height) of every usable input, and how many files are unusable."""
    sizes: list[tuple[int, int]] = []
    unusable = 0
    src: SourceFile
    for src in input_sources(config.input):
        if limit is not None and len(sizes) + unusable >= limit:
            break
        item = images.measure(src, max_side=config.images.max_side)
        if item.error:
            unusable += 1
        else:
            sizes.append((item.sent_width, item.sent_height))
    return sizes, unusable


def _savings(
    spec: Model, sizes: list[tuple[int, int]], resolution: str | None, image_total: int
) -> list[dict[str, Any]]:
    """Image tokens a lower media resolution or (tile rules) a smaller max_side would save."""
    savings: list[dict[str, Any]] = []
    levels = MEDIA_RESOLUTION_TOKENS if spec.tokens == "budget" else GLOBAL_RESOLUTION_TOKENS_2X
    if spec.media_resolution:
        for level in levels:
            if level == resolution or (level == "ultra_high" and not spec.part_media_resolution):
                continue
            total = sum(image_tokens(spec, w, h, level) for w, h in sizes)
            if total < image_total:
                savings.append(
                    {"media_resolution": level, "image_tokens_saved": image_total - total}
                )
    if spec.tokens != "budget" and resolution is None:
        for side in MAX_SIDE_CHOICES:
            total = sum(image_tokens(spec, *_scaled(w, h, side)) for w, h in sizes)
            if total < image_total:
                savings.append({"max_side": side, "image_tokens_saved": image_total - total})
    return savings


def _price_dict(price: Price | None) -> dict[str, Any] | None:
    if price is None:
        return None
    return {
        "input": price.input,
        "output": price.output,
        "batch_input": price.batch_input,
        "batch_output": price.batch_output,
        "until": price.until.isoformat() if price.until else None,
    }


def _cost(
    price: Price | None, input_tokens: int, output_tokens: int, *, batch: bool
) -> float | None:
    return round(price.cost(input_tokens, output_tokens, batch=batch), 4) if price else None


def _time(config: Config, found: int, input_total: int) -> dict[str, Any]:
    minutes = []
    if config.limits.rpm:
        minutes.append(found / config.limits.rpm)
    if config.limits.tpm:
        minutes.append(input_total / config.limits.tpm)
    rpd = config.limits.rpd
    return {
        "minutes_at_limits": round(max(minutes), 2) if minutes else None,
        "days_at_rpd": math.ceil(found / rpd) if rpd and found else None,
    }


def format_estimate(report: dict[str, Any]) -> str:
    most = "at most " if report["image_tokens_are_maxima"] else ""
    lines = [
        f"model {report['model']} (table entry {report['model_entry']}, token rule "
        f"{report['token_rule']}), task {report['task']}",
        f"images: {report['images']:,} ({report['unusable_files']} unusable files)",
        f"input tokens: {most}{report['input_tokens']:,} = images {most}"
        f"{report['image_tokens']:,} + prompts {report['prompt_tokens']:,}",
        f"output tokens: ~{report['output_tokens']:,} ({report['output_tokens_per_image']} an "
        f"image, from {report['output_tokens_from']})",
    ]
    price = report["price_per_million"]
    if price is not None:
        until = f", until {price['until']}" if price["until"] else ""
        lines.append(
            f"cost: ~${report['cost_usd']:,.2f} interactive, "
            f"~${report['batch_cost_usd']:,.2f} in Batch Mode (per 1M tokens: ${price['input']:g} "
            f"in / ${price['output']:g} out; batch ${price['batch_input']:g} / "
            f"${price['batch_output']:g}{until}; pipeline/models.json)"
        )
    else:
        lines.append(
            "cost: no price known for this model (add prices under [models] in the config)"
        )
    if report["minutes_at_limits"] is not None:
        lines.append(f"time at the configured RPM/TPM: ~{report['minutes_at_limits']:,} minutes")
    if report["days_at_rpd"]:
        lines.append(f"days at the configured requests/day: {report['days_at_rpd']}")
    for s in report["savings"]:
        what = (
            f"max_side = {s['max_side']}"
            if "max_side" in s
            else f"media_resolution = {s['media_resolution']}"
        )
        usd = f" (${s['usd_saved']:,.2f})" if s["usd_saved"] is not None else ""
        lines.append(f"  {what} would save {s['image_tokens_saved']:,} image tokens{usd}")
    return "\n".join(lines)
