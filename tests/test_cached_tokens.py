"""Implicit caching, end to end: the answers' cached counts (generateContent's
`cachedContentTokenCount`, Interactions' `total_cached_tokens`) summed over continuation hops
into the row's `cached_tokens`, billed at the cached rate by the run summary and `status` — and
by the local server's own credits, which `--implicit-cache` makes report them (rule
billing.implicit-cache)."""

from __future__ import annotations

import io
import json
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline.commands.status import format_status, status
from pipeline.cost import row_cost
from pipeline.gemini.content import parse_generate_content
from pipeline.gemini.interactions import parse_interaction
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.localserver.caching import CACHE_SECONDS
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.models import lookup
from tests.conftest import Clock, make_config, read_rows, run, save_scenes
from tests.localserver_support import b64, draw_scene, generate

SYSTEM = "Find the shapes."


# ------------------------------------------------------------------ reading the counts
def test_generate_content_cached_counts_are_read_in_either_case_and_summed_over_hops():
    hop = {"candidates": [{"content": {"parts": [{"text": "a"}]}}]}
    first = {**hop, "usageMetadata": {"promptTokenCount": 5000, "cachedContentTokenCount": 4000}}
    snake = {"prompt_token_count": 5000, "cached_content_token_count": 5000}
    second = {**hop, "usage_metadata": snake}
    assert parse_generate_content(json.dumps(first)).usage.cached_tokens == 4000
    assert parse_generate_content(json.dumps([first, second])).usage.cached_tokens == 9000
    assert parse_generate_content(json.dumps(hop)).usage.cached_tokens == 0


def test_interactions_cached_counts_are_summed_over_hops():
    """The SDK's Interactions Usage names it `total_cached_tokens`."""

    def hop(status: str, cached: int | None) -> dict[str, Any]:
        usage: dict[str, Any] = {"total_input_tokens": 6000, "total_output_tokens": 10}
        if cached is not None:
            usage["total_cached_tokens"] = cached
        steps = [{"type": "model_output", "content": [{"type": "text", "text": "x"}]}]
        return {"status": status, "steps": steps, "usage": usage}

    hops = [hop("requires_continuation", None), hop("completed", 6000)]
    usage = parse_interaction(json.dumps(hops)).usage
    assert (usage.prompt_tokens, usage.cached_tokens) == (12000, 6000)


# ------------------------------------------------------------------ the local server's cache
def png(size: tuple[int, int], colour: tuple[int, int, int] = (9, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def scene(seed: int) -> bytes:
    """A small image asked about, different for each seed."""
    return draw_scene(size=(96 + seed, 96))[0]


def request(reference: bytes, target: bytes) -> dict[str, Any]:
    """A system instruction, a reference image, then the image asked about and the prompt."""
    parts = [
        {"text": "Reference image 1: an example."},
        {"inline_data": {"mime_type": "image/png", "data": b64(reference)}},
        {"inline_data": {"mime_type": "image/png", "data": b64(target)}},
        {"text": "Detect the shapes."},
    ]
    return {
        "systemInstruction": {"parts": [{"text": SYSTEM}]},
        "contents": [{"role": "user", "parts": parts}],
    }


def by_hand(model: str, day: date | None, prompt: int, cached: int, output: int) -> float:
    """A bill by hand: the uncached prompt at the input rate, the cached part at the cached
    rate, output (thinking included) at the output rate."""
    price = lookup(model).price(day)
    assert price is not None and price.cached_input is not None
    uncached = (prompt - cached) * price.input
    return (uncached + cached * price.cached_input + output * price.output) / 1e6


def usd(metadata: dict[str, Any]) -> float:
    """A 2.5 Flash generateContent answer's bill, by hand."""
    prompt, cached = metadata["promptTokenCount"], metadata.get("cachedContentTokenCount", 0)
    output = metadata["candidatesTokenCount"] + metadata.get("thoughtsTokenCount", 0)
    return by_hand("gemini-2.5-flash", None, prompt, cached, output)


async def test_a_repeated_prefix_is_reported_cached_and_billed_at_the_cached_rate(
    http: aiohttp.ClientSession,
) -> None:
    """2.5 Flash (caching minimum 2,048): the system instruction + caption + a 1600x400
    reference (3,612 tokens) repeat; the second request, about another image, gets them cached,
    and the server's credits bill them at 0.03 instead of 0.30 per 1M. After the window the
    same prefix is sent in full again."""
    clock = Clock()
    reference = png((1600, 400))
    shared = (
        text_tokens(SYSTEM)
        + text_tokens("Reference image 1: an example.")
        + image_tokens("gemini-2.5-flash", 1600, 400)
    )
    options = ServerOptions(implicit_cache=True, credit_budget_usd=100.0)
    async with LocalServer(options, clock=clock) as server:
        answers = []
        for seed in (1, 2, 2):
            status_code, body = await generate(http, server, request(reference, scene(seed)))
            assert status_code == 200
            answers.append(body["usageMetadata"])
        clock.now += CACHE_SECONDS + 1
        status_code, body = await generate(http, server, request(reference, scene(3)))
        answers.append(body["usageMetadata"])
        stats = server.stats()
    first, other, same, later = answers
    assert "cachedContentTokenCount" not in first  # nothing seen yet
    assert other["cachedContentTokenCount"] == shared  # up to the image that differs
    assert same["cachedContentTokenCount"] == same["promptTokenCount"]  # the whole prompt again
    assert "cachedContentTokenCount" not in later  # the window passed
    assert stats["tokens"]["cached"] == shared + same["promptTokenCount"]
    assert stats["implicit_cache_hits"] == 2
    assert stats["credits"]["spent_usd"] == pytest.approx(sum(map(usd, answers)), abs=1e-9)
    assert usd(other) < usd({**other, "cachedContentTokenCount": 0})


async def test_no_cache_when_off_or_below_the_models_minimum(http: aiohttp.ClientSession) -> None:
    small = png((384, 384))  # 258 tokens: under 2.5's 2,048
    async with LocalServer(ServerOptions(implicit_cache=True)) as server:
        for _ in range(2):
            _, body = await generate(http, server, request(small, scene(1)))
            assert "cachedContentTokenCount" not in body["usageMetadata"]
    async with LocalServer(ServerOptions()) as server:  # off by default
        for _ in range(2):
            _, body = await generate(http, server, request(png((1600, 400)), scene(1)))
            assert "cachedContentTokenCount" not in body["usageMetadata"]


# ------------------------------------------------------------------ a run, end to end
def bill_by_hand(row: dict[str, Any]) -> float:
    output = row["output_tokens"] + (row["thoughts_tokens"] or 0)
    day = row["completed_at"].date()
    return by_hand(row["model"], day, row["prompt_tokens"], row["cached_tokens"], output)


@pytest.mark.parametrize(
    ("flavor", "model", "references", "decode_limit"),
    [
        ("generateContent", "gemini-2.5-flash", [(1600, 400)], None),
        # Interactions with 3 Flash (caching minimum 4,096: four references of 1,120 tokens),
        # answers cut into hops that each re-send (and may cache) the whole prompt
        ("interactions", "gemini-3-flash-preview", [(200, 200)] * 4, 12),
    ],
)
async def test_a_run_bills_cached_tokens_at_the_cached_rate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flavor: str,
    model: str,
    references: list[tuple[int, int]],
    decode_limit: int | None,
) -> None:
    """Every request starts with the same system instruction and reference images: the server
    caches them from the second answer on; each row keeps its cached count (summed over its
    hops), and the run summary, `status` and the server's own credits agree on the bill."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    (tmp_path / "images").mkdir()
    save_scenes(tmp_path / "images", 4, prefix="s", seed=40)
    refs = []
    for i, size in enumerate(references):
        Image.new("RGB", size, (30 * i, 120, 60)).save(tmp_path / f"ref{i}.png")
        refs.append({"image": f"ref{i}.png", "caption": f"example {i}"})
    options = ServerOptions(implicit_cache=True, credit_budget_usd=100.0, decode_limit=decode_limit)
    async with LocalServer(options) as server:
        config = make_config(
            tmp_path,
            # the implicit cache under test: no explicit one (test_context_cache.py)
            api={
                "base_url": server.base_url,
                "model": model,
                "flavor": flavor,
                "context_cache": "off",
            },
            task={"kind": "detect", "reference_images": refs},
        )
        summary = await run(config)
        stats = server.stats()
    assert dict(summary.rows) == {"ok": 4}
    rows = read_rows(tmp_path / "out")
    cached = [row["cached_tokens"] for row in rows]
    if decode_limit is None:  # one answer each: the first answered pays the prefix in full
        assert sorted(cached)[0] == 0 and len(set(sorted(cached)[1:])) == 1 and max(cached) > 0
    else:  # every row had later hops, which re-send the whole prompt
        assert stats["continuations"]["issued"] >= 4 and min(cached) > 0
    assert all(row["cached_tokens"] <= row["prompt_tokens"] for row in rows)
    assert sum(cached) == stats["tokens"]["cached"] == summary.tokens["cached_tokens"]
    assert sum(row["prompt_tokens"] for row in rows) == stats["tokens"]["prompt"]
    expected = sum(bill_by_hand(row) for row in rows)
    assert sum(row_cost(row) or 0 for row in rows) == pytest.approx(expected)
    assert summary.cost_usd == pytest.approx(expected, abs=1e-6)
    assert stats["credits"]["spent_usd"] == pytest.approx(expected, abs=1e-6)
    report = status(tmp_path / "out")
    assert report["cost"]["usd"] == pytest.approx(expected, abs=1e-6)
    assert report["tokens"]["cached"] == sum(cached)
    assert f"(cached {sum(cached):,}, at the cached rate)" in format_status(report)
    no_discount = sum(bill_by_hand({**row, "cached_tokens": 0}) for row in rows)
    assert expected < no_discount
