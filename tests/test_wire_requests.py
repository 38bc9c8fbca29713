"""Every request the pipeline builds, judged by parties that do not share its assumptions.

For each task kind x each model of the table x both API flavours x the settings users change
(thinking, media resolution, a user schema, max_side), the request the pipeline would send is
(1) loaded into the official SDK's own pydantic request types, unknown fields refused, and
(2) sent to the strict local server, which must answer 200. A combination the pipeline refuses
before sending must be refused as a ConfigError naming a key — never sent.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydantic
import pytest
import pytest_asyncio
from google.genai import types
from google.genai._gaos.types.interactions.createmodelinteraction import CreateModelInteraction
from PIL import Image

from pipeline.config import ConfigError, parse_config
from pipeline.gemini import GeminiClient
from pipeline.gemini.content import build_generate_content_body
from pipeline.gemini.interactions import build_interaction_body
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.inputs import images
from pipeline.localserver.server import LocalServer
from pipeline.models import default_table
from pipeline.records import SourceFile
from pipeline.tasks import get_task

MODELS = [m.name for m in default_table().models]
KINDS = {
    "detect": {},
    "segment": {},
    "caption": {},
    "classify": {"labels": ["red", "blue"]},
    "custom": {
        "prompt": "Count the shapes. Answer as JSON.",
        "response_schema": {
            "type": "object",
            "properties": {"count": {"type": "integer"}},
            "required": ["count"],
        },
    },
    "point": {},
}
FLAVORS = ("generateContent", "interactions")
# (name, [task] settings, [api] version): what users change
SETTINGS = [
    ("defaults", {}, "v1beta"),
    ("thinking_high", {"thinking_level": "high"}, "v1beta"),
    ("thinking_budget", {"thinking_budget": 1024}, "v1beta"),
    ("media_low", {"media_resolution": "low"}, "v1beta"),
    ("media_ultra_high", {"media_resolution": "ultra_high"}, "v1alpha"),
    ("media_ultra_high_v1beta", {"media_resolution": "ultra_high"}, "v1beta"),  # 2026-09-19
    ("max_side", {}, "v1"),
]
GENERATE_TOP_LEVEL = {"contents", "systemInstruction", "generationConfig"}
BEFORE_SHUTDOWNS = 1_748_736_000.0  # 2025-06-01 UTC: before the table's first shut-down day


def config_for(tmp_path: Path, model: str, kind: str, flavor: str, setting: tuple) -> Any:
    name, values, version = setting
    task = {"kind": kind, **KINDS[kind], **values}
    images_section = {"max_side": 96} if name == "max_side" else {}
    return parse_config(
        {
            "api": {"model": model, "flavor": flavor, "version": version},
            "task": task,
            "images": images_section,
        },
        "wire-test.toml",
        tmp_path,
    )


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wire") / "shapes.png"
    image = Image.new("RGB", (160, 120), (255, 255, 255))
    image.paste((220, 40, 40), (20, 20, 70, 60))
    image.paste((40, 80, 220), (100, 50, 140, 100))
    image.save(path)
    return path


def image_part(picture: Path, max_side: int | None) -> ImagePart:
    stat = picture.stat()
    src = SourceFile(
        str(picture), str(picture.parent), picture.name, stat.st_size, stat.st_mtime_ns
    )
    item = images.prepare(src, max_side=max_side)
    return ImagePart(item.mime_type, data=images.read_bytes(item))


def assert_sdk_takes_generate(body: dict[str, Any]) -> None:
    """The body's parts, as the SDK's own (extra='forbid') types."""
    assert set(body) <= GENERATE_TOP_LEVEL, set(body) - GENERATE_TOP_LEVEL
    for content in body["contents"]:
        types.Content.model_validate(content)
    if "systemInstruction" in body:
        types.Content.model_validate(body["systemInstruction"])
    if "generationConfig" in body:
        types.GenerationConfig.model_validate(body["generationConfig"])


def assert_sdk_takes_interaction(body: dict[str, Any]) -> None:
    """The Interactions types allow extra fields; refuse them here, at every level."""
    assert_no_extra(CreateModelInteraction.model_validate(body))


def assert_no_extra(value: Any) -> None:
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{type(value).__name__}: unknown {value.model_extra}"
        for field in value.model_fields_set:  # what the body set
            with warnings.catch_warnings():  # the SDK marks some fields deprecated on access
                warnings.simplefilter("ignore", DeprecationWarning)
                inner = getattr(value, field)
            assert_no_extra(inner)
    elif isinstance(value, list | tuple):
        for item in value:
            assert_no_extra(item)


CASES = list(itertools.product(KINDS, MODELS, FLAVORS, SETTINGS))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def endpoints():
    # on a day every model of the table was served: what is sent to a model shut down since is
    # judged as it was then (a run on it is refused: config time, or the preflight's 404)
    async with LocalServer(clock=lambda: BEFORE_SHUTDOWNS) as server:
        clients = {
            version: GeminiClient("wire-key", base_url=server.base_url, version=version)
            for version in ("v1beta", "v1", "v1alpha")
        }
        yield clients
        for client in clients.values():
            await client.close()


@pytest.mark.parametrize(
    ("kind", "model", "flavor", "setting"),
    CASES,
    ids=[f"{k}-{m}-{f}-{s[0]}" for k, m, f, s in CASES],
)
@pytest.mark.asyncio(loop_scope="module")
async def test_what_the_pipeline_sends_is_valid_for_the_sdk_and_the_service(
    kind: str, model: str, flavor: str, setting: tuple, picture: Path, tmp_path: Path, endpoints
) -> None:
    try:
        config = config_for(tmp_path, model, kind, flavor, setting)
    except ConfigError as exc:  # refused before any call, naming a key: never sent
        assert "wire-test.toml: [" in str(exc)
        return
    request: GenerateRequest = get_task(kind).request(config.task)
    request = replace(request, images=(image_part(picture, config.images.max_side),))
    if flavor == "generateContent":
        assert_sdk_takes_generate(build_generate_content_body(request))
    else:
        assert_sdk_takes_interaction(build_interaction_body(request))
    client = endpoints[config.api.version]
    response = await client.generate(request, flavor=flavor)
    assert response.text, "the strict server answered 200 with an answer"


def test_the_matrix_sends_something_for_every_model_and_flavour() -> None:
    """The refusals above are the exception: most combinations do go out."""
    sent = set()
    for kind, model, flavor, setting in CASES:
        try:
            config_for(Path("/tmp"), model, kind, flavor, setting)
        except ConfigError:
            continue
        sent.add((model, flavor))
    interactions_models = {m.name for m in default_table().models if m.interactions}
    expected = {(m, "generateContent") for m in MODELS} | {
        (m, "interactions") for m in interactions_models
    }
    assert sent == expected


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("model", ["gemini-3.5-flash", "gemini-3.6-flash", "gemini-3.5-flash-lite"])
@pytest.mark.asyncio(loop_scope="module")
async def test_models_taking_minimal_are_sent_minimal_by_default(
    model: str, flavor: str, picture: Path, tmp_path: Path, endpoints
) -> None:
    """Issue 18: the table once listed low/medium/high for these, so every request paid for
    `low`; the thinking page (2026-09-04) lists `minimal` for them, the spatial default."""
    config = config_for(tmp_path, model, "detect", flavor, SETTINGS[0])
    request = replace(get_task("detect").request(config.task), images=(image_part(picture, None),))
    if flavor == "generateContent":
        body = build_generate_content_body(request)
        level = body["generationConfig"]["thinkingConfig"]["thinkingLevel"].lower()  # MINIMAL
    else:
        level = build_interaction_body(request)["generation_config"]["thinking_level"]
    assert level == "minimal"
    response = await endpoints["v1beta"].generate(request, flavor=flavor)
    assert response.text
