"""`pipeline estimate`: what a run would cost in tokens, money and time, without one API call.

Image tokens follow the model family's documented rules (pipeline.gemini.tokens), the same rules
the local server bills by; output tokens come from earlier rows of the same task in the output
directory when there are some, else from a per-task guess. Alongside, what downscaling
(`max_side`) or a lower media resolution (Gemini 3) would save.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import images
from pipeline.config import Config
from pipeline.dataset import part_files
from pipeline.gemini.tokens import (
    MEDIA_RESOLUTION_TOKENS,
    image_tokens,
    model_family,
    text_tokens,
)
from pipeline.records import SourceFile
from pipeline.source import input_sources
from pipeline.tasks import get_task

# Output tokens per image when there is no history to learn from: masks are long, labels short.
OUTPUT_GUESS = {"detect": 250, "segment": 2500, "caption": 60, "classify": 8, "custom": 200}
MAX_SIDE_CHOICES = (384, 768, 1024, 1536)


def load_prices() -> dict[str, dict[str, float]]:
    text = resources.files("pipeline").joinpath("prices.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def price_for(model: str, prices: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """The entry whose name is the longest prefix of the model name."""
    name = model.removeprefix("models/")
    matches = [k for k in prices if name.startswith(k)]
    return prices[max(matches, key=len)] if matches else None


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
    """Walk the inputs like a run would and add up the costs."""
    model = config.api.model
    family = model_family(model)
    request = get_task(config.task.kind).request(config.task)
    prompt_tokens = text_tokens((request.system_instruction or "") + request.prompt)
    resolution = config.task.media_resolution
    found = unusable = image_total = 0
    by_side = dict.fromkeys(MAX_SIDE_CHOICES, 0)
    src: SourceFile
    for src in input_sources(config.input):
        if limit is not None and found + unusable >= limit:
            break
        item = images.prepare(src, max_side=config.images.max_side, verify=False)
        if item.error:
            unusable += 1
            continue
        found += 1
        image_total += image_tokens(model, item.sent_width, item.sent_height, resolution)
        for side in MAX_SIDE_CHOICES:
            w, h = _scaled(item.sent_width, item.sent_height, side)
            by_side[side] += image_tokens(model, w, h, resolution)

    history = _output_history(config.output.dir, config.task.kind)
    per_image_output = history[1] if history else OUTPUT_GUESS[config.task.kind]
    input_total = image_total + prompt_tokens * found
    output_total = round(per_image_output * found)
    price = price_for(model, load_prices())
    cost = (input_total * price["input"] + output_total * price["output"]) / 1e6 if price else None
    minutes = []
    if config.limits.rpm:
        minutes.append(found / config.limits.rpm)
    if config.limits.tpm:
        minutes.append(input_total / config.limits.tpm)
    run_minutes = max(minutes) if minutes else None
    days = math.ceil(found / config.limits.rpd) if config.limits.rpd and found else None

    savings: list[dict[str, Any]] = []
    if family == "3":
        current = resolution or "high"
        for level, budget in MEDIA_RESOLUTION_TOKENS.items():
            if budget < MEDIA_RESOLUTION_TOKENS[current]:
                saved = (MEDIA_RESOLUTION_TOKENS[current] - budget) * found
                savings.append({"media_resolution": level, "image_tokens_saved": saved})
    else:
        for side, total in by_side.items():
            if total < image_total:
                savings.append({"max_side": side, "image_tokens_saved": image_total - total})

    def money(tokens_saved: int) -> float | None:
        return round(tokens_saved * price["input"] / 1e6, 4) if price else None

    for s in savings:
        s["usd_saved"] = money(s["image_tokens_saved"])
    return {
        "model": model,
        "model_family": family,
        "task": config.task.kind,
        "images": found,
        "unusable_files": unusable,
        "image_tokens": image_total,
        "prompt_tokens": prompt_tokens * found,
        "input_tokens": input_total,
        "output_tokens": output_total,
        "output_tokens_per_image": round(per_image_output, 1),
        "output_tokens_from": f"{history[0]} earlier rows" if history else "per-task guess",
        "price_per_million": price,
        "cost_usd": round(cost, 4) if cost is not None else None,
        "minutes_at_limits": round(run_minutes, 2) if run_minutes is not None else None,
        "days_at_rpd": days,
        "savings": savings,
    }


def format_estimate(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} (token rules of family {report['model_family']}), "
        f"task {report['task']}",
        f"images: {report['images']:,} ({report['unusable_files']} unusable files)",
        f"input tokens: {report['input_tokens']:,} = images {report['image_tokens']:,}"
        f" + prompts {report['prompt_tokens']:,}",
        f"output tokens: ~{report['output_tokens']:,} ({report['output_tokens_per_image']} an "
        f"image, from {report['output_tokens_from']})",
    ]
    if report["cost_usd"] is not None:
        price = report["price_per_million"]
        lines.append(
            f"cost: ~${report['cost_usd']:,.2f} at ${price['input']:.2f} input and "
            f"${price['output']:.2f} output per 1M tokens (pipeline/prices.json)"
        )
    else:
        lines.append("cost: no price known for this model (pipeline/prices.json)")
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
