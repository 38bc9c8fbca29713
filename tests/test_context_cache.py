"""Explicit context caching (cachedContents), end to end: the client's protocol against the local
server's resource (create, get, renew, delete, expiry, the service's refusals, the billing of
`cachedContentTokenCount`), and a run that caches its reference images: the same rows and keys
as without the cache, the cached share billed at the cached rate, the cache deleted at the end,
renewed while the run lasts, and not made when it would not pay."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types
from PIL import Image

from pipeline import exits
from pipeline.commands.estimate import estimate, format_estimate
from pipeline.config import key_suffixes, parse_config, settings_hash, with_overrides
from pipeline.cost import row_cost
from pipeline.gemini import GeminiClient, GeminiError, parse_response
from pipeline.gemini.caches import create_body, ttl_text
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.inputs.references import ReferenceParts, load
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.models import lookup
from pipeline.output.state import State
from pipeline.run.context_cache import ContextCache
from pipeline.run.costing import Costing
from pipeline.run.uploads import Uploads
from pipeline.tasks import get_task
from tests.conftest import Clock, make_config, read_current, run, save_scenes
from tests.localserver_support import KEY, draw_scene

MODEL = "gemini-2.5-flash"  # caching minimum 2,048 tokens (the model table)
CAPTION = "Reference image 1: an example."
WIDE = (3000, 1000)  # 5 x 2 crops of 258 tokens: 2,580, over the minimum alone
SYSTEM = "Find the shapes."


def png(size: tuple[int, int], colour: tuple[int, int, int] = (9, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def reference(size: tuple[int, int] = WIDE) -> ImagePart:
    return ImagePart("image/png", data=png(size), caption=CAPTION)


def body(size: tuple[int, int] = WIDE, ttl: float = 300, model: str = MODEL) -> dict[str, Any]:
    return create_body(model, system=SYSTEM, images=[reference(size)], ttl_seconds=ttl)


def cached_tokens(size: tuple[int, int] = WIDE) -> int:
    """What the server counts of `body(size)`: the system instruction, caption and image."""
    return text_tokens(SYSTEM) + text_tokens(CAPTION) + image_tokens(MODEL, *size)


def ask(cached: str | None, system: str | None = None, model: str = MODEL) -> GenerateRequest:
    image = ImagePart("image/png", data=draw_scene()[0])
    return GenerateRequest(
        model, "Detect the shapes.", (image,), system_instruction=system, cached_content=cached
    )


def client_of(server: LocalServer) -> GeminiClient:
    return GeminiClient(KEY, base_url=server.base_url, max_hops=1)


# ------------------------------------------------------------------ the resource and its rules
async def test_a_cached_content_lives_until_its_ttl_renewed_by_patch_then_is_gone() -> None:
    clock = Clock()
    async with (
        LocalServer(ServerOptions(api_key=KEY), clock=clock) as server,
        client_of(server) as client,
    ):
        made = await client.caches.create(body(ttl=300))
        assert made.name.startswith("cachedContents/") and made.model == f"models/{MODEL}"
        assert made.total_tokens == cached_tokens()
        clock.now += 200
        renewed = await client.caches.renew(made.name, 300)  # now + 300
        assert renewed.expire_time != made.expire_time
        clock.now += 250  # past the first expiry, within the renewed one
        assert (await client.caches.get(made.name)).name == made.name
        clock.now += 100
        with pytest.raises(GeminiError) as gone:
            await client.caches.get(made.name)
        assert (gone.value.code, gone.value.status) == (404, "NOT_FOUND")
        with pytest.raises(GeminiError) as used:
            await client.generate(ask(made.name))
        assert used.value.code == 404 and "CachedContent not found" in used.value.message
        stats = server.stats()["cached_contents"]
    assert (stats["created"], stats["renewed"], stats["expired"], stats["stored"]) == (1, 1, 1, 0)


async def test_a_request_using_a_cache_bills_it_cached_and_is_answered_the_same() -> None:
    """promptTokenCount counts the cached part, cachedContentTokenCount reports it; the answer
    is that of the same request sent in full; a deleted cache is gone."""
    async with LocalServer(ServerOptions(api_key=KEY)) as server, client_of(server) as client:
        made = await client.caches.create(body())
        via_cache = await client.generate(ask(made.name))
        in_full = replace_images(ask(None, SYSTEM), reference())
        sent_in_full = await client.generate(in_full)
        await client.caches.delete(made.name)
        with pytest.raises(GeminiError) as deleted:
            await client.caches.delete(made.name)
    assert via_cache.text == sent_in_full.text
    assert via_cache.usage.prompt_tokens == sent_in_full.usage.prompt_tokens
    assert via_cache.usage.cached_tokens == made.total_tokens == cached_tokens()
    assert sent_in_full.usage.cached_tokens == 0
    assert deleted.value.code == 404


def replace_images(request: GenerateRequest, first: ImagePart) -> GenerateRequest:
    """`request` with `first` sent before its own images (as a run sends a reference)."""
    return GenerateRequest(
        request.model,
        request.prompt,
        (first, *request.images),
        system_instruction=request.system_instruction,
    )


async def test_the_services_refusals() -> None:
    """Too small (the service's wording, with both counts), the system instruction again
    beside the cache, another model, and a PATCH of anything but the expiry."""
    async with LocalServer(ServerOptions(api_key=KEY)) as server, client_of(server) as client:
        small = cached_tokens((64, 64))
        with pytest.raises(GeminiError) as too_small:
            await client.caches.create(body((64, 64)))
        made = await client.caches.create(body())
        with pytest.raises(GeminiError) as with_system:
            await client.generate(ask(made.name, system=SYSTEM))
        with pytest.raises(GeminiError) as other_model:
            await client.generate(ask(made.name, model="gemini-2.5-flash-lite"))
        with pytest.raises(GeminiError) as before_caching:
            await client.caches.create(body(model="gemini-2.0-flash"))
        stats = server.stats()
    assert too_small.value.code == 400 and too_small.value.status == "INVALID_ARGUMENT"
    expected = f"Cached content is too small. total_token_count={small}, min_total_token_count=2048"
    assert too_small.value.message == expected
    assert with_system.value.code == 400 and "should not be set" in with_system.value.message
    assert other_model.value.code == 400
    assert "(models/gemini-2.5-flash-lite) and CachedContent (models/gemini-2.5-flash)" in (
        other_model.value.message
    )
    assert before_caching.value.code == 404
    refused = stats["refused_by_rule"]
    assert refused["cache.too-small"] == refused["cache.request"] == refused["cache.model"] == 1


async def test_a_patch_changes_the_expiry_only(http, server) -> None:
    async with client_of(server) as client:
        made = await client.caches.create(body())
    url = f"{server.base_url}/v1beta/{made.name}"
    headers = {"x-goog-api-key": KEY}
    async with http.patch(url, params={"updateMask": "displayName"}, json={"ttl": "60s"},
                          headers=headers) as answer:  # fmt: skip
        assert answer.status == 400
    async with http.patch(url, json={"ttl": "soon"}, headers=headers) as answer:
        assert answer.status == 400
    async with http.get(f"{server.base_url}/v1beta/cachedContents", headers=headers) as answer:
        assert [c["name"] for c in (await answer.json())["cachedContents"]] == [made.name]


@pytest.fixture
def server_options() -> ServerOptions:
    return ServerOptions(api_key=KEY)


# ------------------------------------------------------------------ a run
def answer_of(row: dict[str, Any]) -> str:
    return parse_response(row["raw_response"]).text


def _scenes(tmp_path: Path, count: int) -> None:
    (tmp_path / "images").mkdir(exist_ok=True)
    save_scenes(tmp_path / "images", count, prefix="scene", seed=40)
    Image.new("RGB", WIDE, (9, 90, 200)).save(tmp_path / "wide.png")


def _config(tmp_path: Path, out: str, cache: str, **api: Any):
    return make_config(
        tmp_path,
        api={"base_url": "local", "model": MODEL, "context_cache": cache, **api},
        task={"kind": "detect", "reference_images": [{"image": "wide.png", "caption": "a bar"}]},
        output={"dir": str(tmp_path / out), "flush_seconds": 1},
    )


async def test_cached_references_leave_the_rows_and_keys_as_they_were_at_a_lower_bill(
    tmp_path: Path,
) -> None:
    _scenes(tmp_path, 4)
    plain = await run(_config(tmp_path, "plain", "off"))
    cached = await run(_config(tmp_path, "cached", "auto"))
    assert plain.exit_code == cached.exit_code == exits.OK
    assert plain.context_cache is None or plain.context_cache["name"] is None
    cache = cached.context_cache
    assert cache is not None and cache["name"] and cache["deleted"]
    assert cache["storage_usd"] > 0 and cache["stored_hours"] > 0
    before, after = read_current(tmp_path / "plain"), read_current(tmp_path / "cached")
    assert before.keys() == after.keys() and len(after) == 4
    price = lookup(MODEL).price()
    assert price is not None and price.cached_input is not None
    for path, row in after.items():
        old = before[path]
        assert (row["key"], row["status"], row["objects"]) == (
            old["key"],
            old["status"],
            old["objects"],
        )
        assert answer_of(row) == answer_of(old)  # the model's text, word for word
        assert row["prompt_tokens"] == old["prompt_tokens"]
        assert old["cached_tokens"] in (0, None) and row["cached_tokens"] == cache["tokens"]
        saved = row["cached_tokens"] * (price.input - price.cached_input) / 1e6
        assert row_cost(old) - row_cost(row) == pytest.approx(saved)


async def test_a_short_run_is_not_cached_under_auto_and_the_estimate_says_why(
    tmp_path: Path,
) -> None:
    _scenes(tmp_path, 1)
    config = _config(tmp_path, "out", "auto")
    report = estimate(config)["context_cache"]
    assert report["cached"] is False and report["with_usd"] > report["without_usd"]
    assert "context cache (not cached: caching would cost more" in format_estimate(estimate(config))
    summary = await run(config)
    assert summary.exit_code == exits.OK
    why = "1 request(s) left: caching would not pay"
    assert summary.context_cache == {"name": None, "why": why}
    row = next(iter(read_current(tmp_path / "out").values()))
    assert row["cached_tokens"] in (0, None)


def test_the_estimate_prices_a_long_run_with_and_without_the_cache(tmp_path: Path) -> None:
    _scenes(tmp_path, 5)
    whole = estimate(_config(tmp_path, "out", "auto"))
    report = whole["context_cache"]
    cached_run = whole["cost_usd"] - report["without_usd"] + report["with_usd"]
    assert f"in full, ~${cached_run:,.4f} cached" in format_estimate(whole)
    assert report["cached"] is True and report["with_usd"] < report["without_usd"]
    tokens = report["tokens"]
    config = _config(tmp_path, "out", "auto")
    system = get_task("detect").request(config.task).system_instruction
    caption = text_tokens(load(config)[0].caption)
    assert tokens == text_tokens(system or "") + caption + image_tokens(MODEL, *WIDE)
    price = lookup(MODEL).price()
    assert price is not None
    assert report["without_usd"] == pytest.approx(5 * tokens * price.input / 1e6, abs=1e-6)


# ------------------------------------------------------------------ renewal, by the server clock
async def test_the_cache_is_renewed_before_it_expires_while_the_run_lasts(tmp_path: Path) -> None:
    """The renewal task's waits move the server's clock instead of passing (a hand clock): each
    half TTL it renews, so the cache outlives its first TTL; closing deletes it."""
    _scenes(tmp_path, 1)
    clock = Clock()
    ticks: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(seconds: float) -> None:  # one half TTL passes when the test says so
        await ticks.get()
        clock.now += seconds

    async with LocalServer(ServerOptions(api_key=KEY), clock=clock) as server:
        config = _config(tmp_path, "out", "on", base_url=server.base_url, context_cache_ttl=100)
        request = get_task("detect").request(config.task)
        loaded = load(config)
        async with client_of(server) as client:
            uploads = Uploads(client, State(tmp_path / "out"))
            parts = ReferenceParts(loaded, "inline", uploads=uploads)
            context = ContextCache(
                config, client, Costing(config, request, loaded), request, parts, sleep=sleep
            )
            name = await context.name(first=True)
            assert name is not None
            for renewals in (1, 2, 3):  # 150 s in all: past the first TTL of 100 s
                ticks.put_nowait(None)
                while context.renewed < renewals:
                    await asyncio.sleep(0)
            answer = await client.generate(ask(name))
            await context.close()
            stats = server.stats()["cached_contents"]
    assert answer.usage.cached_tokens == context.cache.total_tokens  # type: ignore[union-attr]
    assert (stats["renewed"], stats["deleted"], stats["stored"]) == (3, 1, 0)
    assert context.summary()["deleted"] is True  # type: ignore[index]


# ------------------------------------------------------------------ the SDK's own requests
async def test_the_sdks_caches_work_against_the_server(server) -> None:
    """google-genai's caches.create / get / update / delete and a generate_content naming the
    cache, unchanged: the SDK's requests are the reference of what the service takes."""
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.base_url))
    config = types.CreateCachedContentConfig(
        contents=[types.Part.from_bytes(data=png(WIDE), mime_type="image/png")],
        system_instruction=SYSTEM,
        ttl="300s",
    )
    made = await asyncio.to_thread(client.caches.create, model=MODEL, config=config)
    assert made.usage_metadata.total_token_count == text_tokens(SYSTEM) + image_tokens(MODEL, *WIDE)
    renewed = await asyncio.to_thread(
        client.caches.update, name=made.name, config=types.UpdateCachedContentConfig(ttl="600s")
    )
    assert renewed.expire_time > made.expire_time
    answer = await asyncio.to_thread(
        client.models.generate_content,
        model=MODEL,
        contents=[types.Part.from_bytes(data=draw_scene()[0], mime_type="image/png"), "Detect."],
        config=types.GenerateContentConfig(cached_content=made.name),
    )
    cached = answer.usage_metadata.cached_content_token_count
    assert cached == made.usage_metadata.total_token_count
    await asyncio.to_thread(client.caches.delete, name=made.name)
    assert server.stats()["cached_contents"]["deleted"] == 1


# ------------------------------------------------------------------ a run that loses or stops
def _answered(server: list[LocalServer]) -> int:
    return sum(server[0].stats()["answers_by_task"].values()) if server else 0


async def test_a_cache_gone_mid_run_is_left_and_the_rest_sent_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's clock passes the cache's TTL after two answers, before a renewal: the next
    request is refused (404), sent again at once in full, and the run loses nothing."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    _scenes(tmp_path, 5)
    start = time.time()
    server: list[LocalServer] = []

    def clock() -> float:
        return start + (1000.0 if _answered(server) >= 2 else 0.0)

    async with LocalServer(ServerOptions(api_key=KEY), clock=clock) as local:
        server.append(local)
        config = _config(tmp_path, "out", "on", base_url=local.base_url, context_cache_ttl=100)
        config = with_overrides(config, {"limits.concurrency": 1})
        summary = await run(config)
        stats = local.stats()
    assert summary.exit_code == exits.OK and dict(summary.rows) == {"ok": 5}
    assert summary.retries == 0  # not a failure: the same attempt again, in full
    cache = summary.context_cache
    assert cache is not None and "a request found it gone" in cache["lost"]
    assert not cache["deleted"] and stats["cached_contents"]["expired"] == 1
    cached = sorted(row["cached_tokens"] or 0 for row in read_current(tmp_path / "out").values())
    assert cached == [0, 0, 0, cache["tokens"], cache["tokens"]]


async def test_a_run_stopped_by_its_cap_still_deletes_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    _scenes(tmp_path, 6)
    async with LocalServer(ServerOptions(api_key=KEY)) as local:
        config = _config(tmp_path, "out", "on", base_url=local.base_url)
        config = with_overrides(config, {"limits.concurrency": 1, "limits.max_usd": 0.002})
        summary = await run(config)
        stats = local.stats()["cached_contents"]
    assert summary.exit_code == exits.STOPPED, summary.spend
    assert 0 < sum(summary.rows.values()) < 6
    cache = summary.context_cache
    assert cache is not None and cache["deleted"]
    assert (stats["created"], stats["deleted"], stats["stored"]) == (1, 1, 0)
    # the cap counted the cache too: its create (its tokens at the input rate) and storage
    price = lookup(MODEL).price()
    assert price is not None and summary.spend is not None
    rows = sum(row_cost(row) or 0 for row in read_current(tmp_path / "out").values())
    create = cache["tokens"] * price.input / 1e6
    spent = rows + create + cache["storage_usd"]
    assert summary.spend["spent_usd"] == pytest.approx(spent, abs=2e-6)


# ------------------------------------------------------------------ the keys
@pytest.mark.parametrize(
    ("task", "extra", "as_is", "resized", "legacy"),
    [
        # computed by the release before context caching (commit 7b2be51)
        ("detect", {}, "36c2d78d176f7941", None, "5837394ec4244dc9"),
        ("segment", {"images": {"max_side": 640}}, "87817053c0366c22", "107fd47307c0ebc3",
         "9f61e62278b761cb"),
        ("caption", {"api": {"model": "gemini-3-flash-preview"}}, "6d35c75b31436aec", None,
         "ab0330ed161474e3"),
    ],
)  # fmt: skip
def test_keys_are_those_of_the_release_before_and_a_cache_does_not_change_them(
    tmp_path: Path,
    task: str,
    extra: dict[str, Any],
    as_is: str,
    resized: str | None,
    legacy: str,
) -> None:
    """`cached_content` is how a request travels, not what it asks: out of every hash, so the
    keys an output holds are found after the upgrade, and a cached request keys as in full."""
    config = parse_config({"task": {"kind": task}, **extra}, "x.toml", tmp_path)
    request = get_task(task).request(config.task)
    cached = dataclasses.replace(request, cached_content="cachedContents/abc")
    for sent in (request, cached):
        suffixes = key_suffixes(config, sent)
        assert (suffixes.as_is, suffixes.resized) == (as_is, resized)
        assert settings_hash(config, sent) == legacy


async def test_on_says_why_it_could_not_cache(tmp_path: Path) -> None:
    """A repeated part under the model's minimum is sent in full even with "on"; the summary
    says why (and `auto`, with nothing worth caching, says nothing)."""
    _scenes(tmp_path, 2)
    Image.new("RGB", (64, 64), (9, 90, 200)).save(tmp_path / "wide.png")  # 258 tokens
    summary = await run(_config(tmp_path, "out", "on"))
    assert summary.exit_code == exits.OK
    assert summary.context_cache is not None and summary.context_cache["name"] is None
    assert "under the minimum of 2,048" in summary.context_cache["why"]
    assert (await run(_config(tmp_path, "auto-out", "auto"))).context_cache is None


def test_a_ttl_is_a_duration_in_plain_seconds_at_any_size() -> None:
    """`:g` wrote 1e+06s for a TTL of 1,000,000 s, which a google.protobuf.Duration refuses."""
    assert [ttl_text(t) for t in (600, 600.0, 0.5, 1_000_000, 86_400.25)] == [
        "600s",
        "600s",
        "0.5s",
        "1000000s",
        "86400.25s",
    ]
