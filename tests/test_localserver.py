"""The local Gemini-compatible server's core over loopback: answers from pixels, faults,
latency, replay, stats, the command line and the rules registry.

The surfaces' strictness has its own files: test_localserver_generate.py,
test_localserver_interactions.py, test_localserver_files.py, test_localserver_limits.py and
test_localserver_fields.py (the accepted field trees against the SDK's types).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

from pipeline.localserver.faults import FAULT_KINDS, Faults
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.rules import RULES
from pipeline.localserver.server import LocalServer
from tests.conftest import REPO, box_iou, child_env, mask_iou, until
from tests.localserver_support import (
    DETECT,
    SEGMENT,
    SHAPES,
    answer_text,
    decode_png_mask,
    draw_scene,
    generate,
    inline_request,
    pixel_box,
    polygon_mask,
    upload,
)

# answers from pixels


@pytest.mark.parametrize("fmt,size", [("PNG", (384, 384)), ("JPEG", (512, 384))])
async def test_detection_boxes_match_drawn_shapes(server, http, fmt, size):
    data, truth = draw_scene(fmt, size)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    config = {"responseMimeType": "application/json", "thinkingConfig": {"thinkingBudget": 0}}
    status, body = await generate(http, server, inline_request(data, DETECT, mime, config))
    assert status == 200
    assert body["candidates"][0]["finishReason"] == "STOP"
    items = json.loads(answer_text(body))
    assert [item["label"] for item in items] == [label for label, *_ in SHAPES]
    for item in items:
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in item["box_2d"])
        assert box_iou(pixel_box(item["box_2d"], *size), truth[item["label"]][0]) >= 0.95


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_png_masks_decode_to_the_drawn_shapes(server, http, fmt):
    data, truth = draw_scene(fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    config = {"responseMimeType": "application/json"}
    status, body = await generate(http, server, inline_request(data, SEGMENT, mime, config))
    assert status == 200
    items = json.loads(answer_text(body))
    assert sorted(item["label"] for item in items) == sorted(truth)
    for item in items:
        assert list(item) == ["box_2d", "mask", "label"]  # the order the guide shows
        box, true_mask = truth[item["label"]]
        assert box_iou(pixel_box(item["box_2d"], 384, 384), box) >= 0.95
        assert mask_iou(decode_png_mask(item, 384, 384), true_mask) >= 0.9


BOXES_SCHEMA = {  # the image-understanding page's 3.8 Flash sample (2026-09), as JSON Schema
    "type": "object",
    "properties": {
        "boxes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "box_2d": {"type": "array", "items": {"type": "integer"}},
                    "label": {"type": "string"},
                    "mask": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "integer"}},
                    },
                },
            },
        }
    },
}


async def test_newer_models_answer_polygon_masks_for_the_boxes_schema(server, http):
    data, truth = draw_scene("JPEG", (512, 384))
    config = {"responseMimeType": "application/json", "responseJsonSchema": BOXES_SCHEMA}
    status, body = await generate(
        http, server, inline_request(data, SEGMENT, "image/jpeg", config), model="gemini-3.8-flash"
    )
    assert status == 200
    boxes = json.loads(answer_text(body))["boxes"]
    assert sorted(item["label"] for item in boxes) == sorted(truth)
    for item in boxes:
        box, true_mask = truth[item["label"]]
        assert box_iou(pixel_box(item["box_2d"], 512, 384), box) >= 0.95
        assert all(0 <= x <= 1000 and 0 <= y <= 1000 for x, y in item["mask"])
        assert mask_iou(polygon_mask(item["mask"], 512, 384), true_mask) >= 0.9


@pytest.mark.parametrize(
    ("model", "schema"), [("gemini-3.8-flash", None), ("gemini-3.5-flash", BOXES_SCHEMA)]
)
async def test_masks_come_only_from_models_and_requests_that_get_them(server, http, model, schema):
    """3.8 masks only for the boxes schema (the 2026-09 page's way); 3.5 gives none at all (its
    migration checklist): boxes only, in both cases (what they answer instead is assumed)."""
    data, truth = draw_scene("JPEG", (512, 384))
    config: dict = {"responseMimeType": "application/json"}
    if schema:
        config["responseJsonSchema"] = schema
    status, body = await generate(
        http, server, inline_request(data, SEGMENT, "image/jpeg", config), model=model
    )
    assert status == 200
    answer = json.loads(answer_text(body))
    items = answer["boxes"] if isinstance(answer, dict) else answer
    assert len(items) == len(truth) and all("mask" not in item for item in items)


async def test_without_json_mode_json_comes_in_a_markdown_fence(server, http):
    data, _ = draw_scene()
    status, body = await generate(http, server, inline_request(data, DETECT))
    assert status == 200
    text = answer_text(body)
    assert text.startswith("```json\n") and text.endswith("\n```")
    assert len(json.loads(text[len("```json\n") : -len("\n```")])) == 3


async def test_caption_names_the_shapes_and_background(server, http):
    data, _ = draw_scene()
    status, body = await generate(http, server, inline_request(data, "Describe this image."))
    assert status == 200
    assert answer_text(body) == (
        "An image of 3 shapes on a white background: "
        "a red circle, a green triangle and a blue rectangle."
    )


async def test_classification_from_schema_enum_and_from_prompt(server, http):
    single = (("blue rectangle", "rectangle", (100, 120, 300, 260), (40, 80, 220)),)
    data, _ = draw_scene(shapes=single)
    schema = {"type": "STRING", "enum": ["circle", "rectangle", "triangle"]}
    config = {"responseMimeType": "application/json", "responseSchema": schema}
    status, body = await generate(
        http, server, inline_request(data, "What shape is this?", config=config)
    )
    assert status == 200 and json.loads(answer_text(body)) == "rectangle"
    config = {"responseMimeType": "text/x.enum", "responseSchema": schema}
    _, body = await generate(http, server, inline_request(data, "Classify.", config=config))
    assert answer_text(body) == "rectangle"
    prompt = "Classify the image. Answer with exactly one of these labels: red things, blue things."
    _, body = await generate(http, server, inline_request(data, prompt))
    assert answer_text(body) == "blue things"


async def test_closed_label_sets_for_detection_and_multi_label_classification(server, http):
    data, truth = draw_scene()
    config = {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "ARRAY",
            "items": {
                "type": "OBJECT",
                "properties": {
                    "box_2d": {"type": "ARRAY", "items": {"type": "INTEGER"}},
                    "label": {"type": "STRING", "enum": ["circle", "triangle"]},
                },
            },
        },
    }
    status, body = await generate(http, server, inline_request(data, DETECT, config=config))
    assert status == 200
    items = json.loads(answer_text(body))  # the rectangle fits no label: left out
    assert [item["label"] for item in items] == ["circle", "triangle"]
    assert box_iou(pixel_box(items[1]["box_2d"], 384, 384), truth["green triangle"][0]) >= 0.95
    body = inline_request(data, "Detect all of the following items in the image. box_2d")
    body["systemInstruction"] = {
        "parts": [{"text": 'Only report objects that are one of: "red things", "green things".'}]
    }
    _, answer = await generate(http, server, body)
    assert answer_text(answer).count("things") == 2 and "blue" not in answer_text(answer)
    labels_schema = {
        "type": "ARRAY",
        "items": {"type": "STRING", "enum": ["square", "oval", "star"]},
    }
    config = {"responseMimeType": "application/json", "responseSchema": labels_schema}
    prompt = "Classify this image. Answer with a JSON list of every label that applies."
    _, answer = await generate(http, server, inline_request(data, prompt, config=config))
    assert json.loads(answer_text(answer)) == ["square", "oval"]


async def test_custom_schema_is_filled_from_what_is_seen(server, http):
    data, _ = draw_scene()
    schema = {
        "type": "object",
        "properties": {
            "count": {"type": "integer"},
            "colours": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["count", "colours"],
    }
    config = {"responseMimeType": "application/json", "responseJsonSchema": schema}
    prompt = "Count the shapes in the image and name their colours. Answer as JSON."
    status, body = await generate(http, server, inline_request(data, prompt, config=config))
    assert status == 200
    assert json.loads(answer_text(body)) == {"count": 3, "colours": ["red", "green", "blue"]}
    # JSON mode without a schema: the shape sketched in the prompt, else a summary object
    config = {"responseMimeType": "application/json"}
    prompt = 'Count the shapes. Answer as JSON {"count": n, "shapes": [...]}.'
    _, body = await generate(http, server, inline_request(data, prompt, config=config))
    assert json.loads(answer_text(body)) == {
        "count": 3,
        "shapes": ["circle", "triangle", "rectangle"],
    }
    _, body = await generate(http, server, inline_request(data, "Describe it.", config=config))
    assert json.loads(answer_text(body))["objects"] == [label for label, *_ in SHAPES]


async def test_object_limit_and_colour_filter_follow_the_prompt(server, http):
    data, _ = draw_scene()
    config = {"responseMimeType": "application/json"}
    _, body = await generate(
        http, server, inline_request(data, DETECT + " Limit to 2 objects.", config=config)
    )
    assert [i["label"] for i in json.loads(answer_text(body))] == ["red circle", "green triangle"]
    _, body = await generate(
        http, server, inline_request(data, "Detect all green objects. box_2d", config=config)
    )
    assert [i["label"] for i in json.loads(answer_text(body))] == ["green triangle"]


async def test_points_are_centres_y_first(server, http):
    data, truth = draw_scene()
    prompt = (
        'Point to the items. Answer [{"point": [y, x], "label": <label>}] normalized to 0-1000.'
    )
    _, body = await generate(
        http, server, inline_request(data, prompt, config={"responseMimeType": "application/json"})
    )
    for item in json.loads(answer_text(body)):
        ys, xs = np.nonzero(truth[item["label"]][1])
        y, x = item["point"]
        assert abs(y - ys.mean() / 384 * 1000) <= 5 and abs(x - xs.mean() / 384 * 1000) <= 5


async def test_webp_and_heic_are_read(server, http):
    import pillow_heif

    pillow_heif.register_heif_opener()
    image = Image.open(io.BytesIO(draw_scene()[0]))
    for fmt, mime in (("WEBP", "image/webp"), ("HEIF", "image/heic")):
        buffer = io.BytesIO()
        image.save(buffer, fmt, quality=90)
        config = {"responseMimeType": "application/json"}
        status, body = await generate(
            http, server, inline_request(buffer.getvalue(), DETECT, mime, config)
        )
        assert status == 200
        assert len(json.loads(answer_text(body))) == 3


# faults, latency, replay


async def fault_outcomes(http: aiohttp.ClientSession, options: ServerOptions, n: int) -> list:
    outcomes = []
    async with LocalServer(options) as server:
        data, _ = draw_scene()
        config = {"responseMimeType": "application/json"}
        for i in range(n):
            body = inline_request(data, f"{SEGMENT} (request {i})", config=config)
            status, answer = await generate(http, server, body)
            if status != 200:
                outcomes.append((status, answer["error"]["status"]))
            else:
                candidate = answer["candidates"][0]
                outcomes.append((status, candidate["finishReason"], answer_text(answer)))
        injected = server.stats()["faults"]
    return [outcomes, injected]


def fault_kind(outcome: tuple) -> str | None:
    if outcome[0] != 200:
        return {500: "http_500", 503: "http_503", 504: "hang"}[outcome[0]]
    if outcome[1] == "MAX_TOKENS":
        return "max_tokens"
    text = outcome[2]
    if text.startswith("```"):
        return "fenced_json"
    items = json.loads(text)
    if any(max(item["box_2d"]) > 1000 for item in items):
        return "box_out_of_range"
    if any(not item["mask"].startswith("data:") for item in items):
        return "mask_without_prefix"
    return None


async def test_faults_are_seeded_and_cover_the_mix(http):
    options = ServerOptions(fault_rate=1.0, seed=11, hang_seconds=0.01)
    outcomes, injected = await fault_outcomes(http, options, 60)
    kinds = [fault_kind(o) for o in outcomes]
    assert None not in kinds
    assert set(kinds) == set(FAULT_KINDS)
    assert injected == {k: kinds.count(k) for k in FAULT_KINDS}
    mixed = ServerOptions(fault_rate=0.3, seed=5, hang_seconds=0.01)
    first = await fault_outcomes(http, mixed, 30)
    assert first == await fault_outcomes(http, mixed, 30)  # same seed, same story
    reseeded = ServerOptions(fault_rate=0.3, seed=6, hang_seconds=0.01)
    assert first != await fault_outcomes(http, reseeded, 30)
    faulty = sum(fault_kind(o) is not None for o in first[0])
    assert 3 <= faulty <= 18


async def test_a_retried_request_draws_afresh(http):
    async with LocalServer(ServerOptions(fault_rate=0.5, seed=1, hang_seconds=0.01)) as server:
        data, _ = draw_scene()
        body = inline_request(data, DETECT, config={"responseMimeType": "application/json"})
        statuses = {(await generate(http, server, body))[0] for _ in range(12)}
        assert 200 in statuses and len(statuses) > 1


def test_latency_is_lognormal_with_the_requested_mean():
    faults = Faults(rate=0.0, seed=3, latency_ms=200)
    draws = [faults.draw(i.to_bytes(4, "big")).latency_seconds for i in range(4000)]
    assert statistics.fmean(draws) == pytest.approx(0.2, rel=0.05)
    assert statistics.median(draws) < 0.2 < max(draws) / 2  # long right tail
    again = Faults(rate=0.0, seed=3, latency_ms=200)
    assert [again.draw(i.to_bytes(4, "big")).latency_seconds for i in range(10)] == draws[:10]


async def test_latency_delays_answers(http):
    async with LocalServer(ServerOptions(latency_ms=40, seed=2)) as server:
        data, _ = draw_scene()
        started = time.perf_counter()
        await asyncio.gather(*(generate(http, server, inline_request(data, "x")) for _ in range(8)))
        assert time.perf_counter() - started >= 0.01


async def test_replay_serves_recorded_answers_by_image_hash(http, tmp_path):
    data, _ = draw_scene()
    other, _ = draw_scene("JPEG")
    replay = tmp_path / "replay.jsonl"
    records = [
        {
            "sha256": hashlib.sha256(data).hexdigest(),
            "text": '[{"box_2d": [1, 2',
            "finish_reason": "MAX_TOKENS",
        },
        {"sha256": hashlib.sha256(data).hexdigest(), "text": "[]", "finish_reason": "STOP"},
        {"sha256": "*", "text": "anything else"},
    ]
    replay.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    async with LocalServer(ServerOptions(replay=str(replay))) as server:
        answers = []
        for image, mime in ((data, "image/png"), (data, "image/png"), (other, "image/jpeg")):
            _, body = await generate(http, server, inline_request(image, DETECT, mime))
            answers.append((answer_text(body), body["candidates"][0]["finishReason"]))
        assert answers == [
            ('[{"box_2d": [1, 2', "MAX_TOKENS"),
            ("[]", "STOP"),
            ("anything else", "STOP"),
        ]
        assert server.stats()["replayed"] == 3
    replay.write_text('{"text": "no hash"}\n')
    with pytest.raises(ValueError, match=r"replay\.jsonl:1"):
        LocalServer(ServerOptions(replay=str(replay)))


# stats and the command line


async def test_a_request_inside_its_latency_is_counted_on_arrival(http):
    """`requests_received` counts a request when it arrives, `requests` when it is answered: a
    test that kills a client mid-run bounds what was in flight by the first."""
    data, _ = draw_scene()
    path = "POST /v1beta/models/gemini-2.5-flash:generateContent"
    async with LocalServer(ServerOptions(latency_ms=600, seed=1)) as slow:
        call = asyncio.create_task(generate(http, slow, inline_request(data, "Describe.")))
        await until(lambda: slow.stats()["requests_received"].get(path) == 1)
        assert path not in slow.stats()["requests"]  # arrived, not answered yet
        status, _ = await call
        assert status == 200 and slow.stats()["requests"][path] == {"200": 1}


async def test_local_stats_counts_requests_tokens_and_uploads(server, http):
    data, _ = draw_scene()
    _, ok = await generate(http, server, inline_request(data, "Describe."))
    await generate(http, server, inline_request(data, "Describe."), key=None)
    await upload(http, server, data)
    async with http.get(f"{server.base_url}/local/stats") as response:
        stats = await response.json()
    assert stats == server.stats()
    assert stats["requests"]["POST /v1beta/models/gemini-2.5-flash:generateContent"] == {
        "200": 1,
        "403": 1,
    }
    assert stats["requests"]["POST /upload/v1beta/files"] == {"200": 2}
    assert stats["requests_received"] == {  # on arrival; /local/stats itself not counted
        "POST /v1beta/models/gemini-2.5-flash:generateContent": 2,
        "POST /upload/v1beta/files": 2,
    }
    assert stats["uploads"] == {"started": 1, "completed": 1, "bytes": len(data)}
    usage = ok["usageMetadata"]
    assert stats["tokens"]["prompt"] == usage["promptTokenCount"]
    assert stats["tokens"]["total"] == usage["totalTokenCount"]
    assert stats["tokens"]["prompt_by_modality"]["IMAGE"] == 258
    assert stats["images"] == 1 and stats["answers_by_task"] == {"caption": 1}


async def test_cli_prints_its_url_first_and_stops_on_sigterm(http):
    env = child_env()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.localserver",
        "--port",
        "0",
        "--api-key",
        "cli-secret",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        base = match.group(0)
        async with http.get(f"{base}/v1beta/files", headers={"x-goog-api-key": "cli-secret"}) as r:
            assert r.status == 200
        async with http.get(f"{base}/v1beta/files", headers={"x-goog-api-key": "other"}) as r:
            assert r.status == 400
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        rest = (await process.stdout.read() + await process.stderr.read()).decode()
        assert "cli-secret" not in line + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# the rules registry


def test_every_rule_is_cited_by_the_server_and_every_citation_is_a_rule():
    """The registry is the one place rules live: every rule is cited where it is enforced (a
    refusal's rule=..., or the docstring of the module producing a behaviour), and no refusal
    cites an unregistered id (ApiError also checks that at run time)."""
    package = REPO / "pipeline" / "localserver"
    source = "\n".join(path.read_text() for path in package.glob("*.py") if path.name != "rules.py")
    cited = set(re.findall(r"\b([a-z0-9-]+\.[a-z0-9-]+)\b", source)) & set(RULES)
    assert set(RULES) <= cited, sorted(set(RULES) - cited)
    assert {c for c in re.findall(r'rule="([^"]+)"', source)} <= set(RULES)
    for rule in RULES.values():
        assert rule.source and rule.description and rule.wording in ("service", "written")


# a date (2026-09, 2026-09-19) or an SDK version (google-genai 3.6): what makes a source dated
DATED = re.compile(r"\b20\d\d-(0[1-9]|1[0-2])(-[0-3]\d)?\b|\bgoogle-genai \d+\.\d+\b")


def test_every_rule_has_a_dated_source_or_says_it_is_an_assumption():
    """What the service did on a date can change: each rule says when its source said so, or
    that it is an assumption (no source found), and never both."""
    for rule in RULES.values():
        if rule.assumed:
            assert not DATED.search(rule.dated), rule.id
            continue
        assert DATED.search(rule.dated), rule.id
        cited = DATED.sub("", rule.dated)
        assert len(re.findall(r"[A-Za-z]{3,}", cited)) >= 2, rule.id  # a page, file or thread


async def test_refusals_are_counted_by_rule(server, http):
    data, _ = draw_scene()
    body = inline_request(data, "x", config={"thinkingConfig": {"thinkingLevel": "LOW"}})
    status, _ = await generate(http, server, body)  # 2.5 Flash takes a budget, not a level
    assert status == 400
    await generate(http, server, inline_request(data, "x"), key=None)
    assert server.stats()["refused_by_rule"] == {
        "thinking.level-unsupported": 1,
        "auth.missing-key": 1,
    }


def test_cli_prints_the_rules_with_their_sources():
    env = child_env()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.localserver", "--rules"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = done.stdout
    for rule_id, rule in RULES.items():
        assert f"{rule_id}  [{rule.answer}]" in printed
        assert (f"dated: {rule.dated}" if not rule.assumed else "assumed: no dated source") in (
            printed.split(f"{rule_id}  [", 1)[1].split("\n\n", 1)[0]
        )
    assert "source: docs/gemini-api.md § Files API" in printed
