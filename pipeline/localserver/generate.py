"""The generateContent surface: `POST /{version}/models/{model}:generateContent` and
`:countTokens`, strict as the service is.

A request passes: the key; the model (known to the table, rule model.unknown); the body against
the GenerateContentRequest tree (fields.py: unknown names and wrong kinds at any depth); the
settings against the model (model_checks.py: thinking, schemas, media resolution); the images
(image_input.py); a cached content it names (context_cache.py: read first, its tokens reported
cached); then credits and quotas, the answer, what an implicit cache served (caching.py,
`--implicit-cache`) when no cached content was named, and the bill. `parse_request`,
`with_output` and `response_body` are the pieces the Batch Mode surface (batches.py) reuses for
each of its requests.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from aiohttp import web

from pipeline.localserver import errors, model_checks
from pipeline.localserver.answering import ModelOutput, Prompted
from pipeline.localserver.answers import Ask
from pipeline.localserver.billing import Usage, prompt_usage
from pipeline.localserver.caching import prefix_of
from pipeline.localserver.core import Core
from pipeline.localserver.fields import COUNT_TOKENS_REQUEST, GENERATE_CONTENT_REQUEST
from pipeline.localserver.image_input import ImageInput, ImageReader
from pipeline.localserver.spec import check, get
from pipeline.models import Model

METHODS = ("generateContent", "countTokens")


class GenerateSurface:
    """Routes of generateContent and countTokens."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def routes(self, app: web.Application, version: str) -> None:
        app.router.add_post(f"/{version}/models/{{model_action}}", self.model_method)

    async def model_method(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        version = request.match_info["version"]
        return await self.serve(request, version, request.match_info["model_action"])

    async def serve(
        self,
        request: web.Request,
        version: str,
        model_action: str,
        images: ImageReader | None = None,
        *,
        vertex: bool = False,
        traffic_type: str | None = None,
    ) -> web.Response:
        """A caller already let in: its `model:method` answered; `images` reads its image parts
        (the Vertex surface's own reader resolves gs:// URIs; vertex.py), and a `vertex`
        countTokens body holds contents and systemInstruction at its top level; `traffic_type`:
        Vertex's usageMetadata.trafficType of the answer."""
        images = images or self.core.images
        model_id, _, method = model_action.rpartition(":")
        if method not in METHODS or not model_id:
            raise errors.unsupported_here(f"Method '{method}'")
        model = model_checks.known_model(
            model_id, version, method, table=self.core.models, on=self.core.today()
        )
        body = await self.core.body(request)
        model_id = model_id.removeprefix("models/")
        if method == "countTokens":
            counted = body if vertex else _count_request(body, version)
            return web.json_response(self._count(counted, model, model_id, version, images))
        prompted = parse_request(body, model, model_id, version, images)
        cached = None
        if get(body, "cached_content") is not None:
            prompted, cached = self.core.contexts.resolve(body, prompted)
        prompt = prompt_usage(prompted)
        outcome = await self.core.answer(prompted, prompt)
        if cached is None:
            prompt = self.core.from_cache(model_id, prefix_of(prompted), prompt)
        else:  # what a cached content holds is served from it, whatever the implicit cache has
            prompt = replace(prompt, cached_tokens=cached.tokens)
        usage = with_output(prompt, outcome)
        self.core.bill(model_id, usage, outcome.task, len(prompted.images))
        return web.json_response(response_body(outcome, usage, model_id, traffic_type))

    def _count(
        self,
        request: dict[str, Any],
        model: Model,
        model_id: str,
        version: str,
        images: ImageReader,
    ) -> dict:
        prompted = parse_request(request, model, model_id, version, images)
        usage = prompt_usage(prompted)
        return {"totalTokens": usage.prompt_tokens, "promptTokensDetails": modalities(usage)}


def _count_request(body: dict[str, Any], version: str) -> dict[str, Any]:
    """The Developer API's CountTokensRequest: its contents, or its generateContentRequest."""
    check(body, COUNT_TOKENS_REQUEST, version=version)
    return get(body, "generate_content_request") or {"contents": get(body, "contents")}


def parse_request(
    body: dict[str, Any], model: Model, model_id: str, version: str, images: ImageReader
) -> Prompted:
    """A GenerateContentRequest checked and reduced to a Prompted (ApiError when refused)."""
    check(body, GENERATE_CONTENT_REQUEST, version=version)
    config = get(body, "generation_config", {})
    thinking = get(config, "thinking_config")
    budget = get(thinking, "thinking_budget")
    thinks = model_checks.check_thinking(model, thinking, budget, get(thinking, "thinking_level"))
    schema, json_schema = get(config, "response_schema"), get(config, "response_json_schema")
    model_checks.check_schemas(model, schema, json_schema)
    resolution = model_checks.global_resolution(model, get(config, "media_resolution"))
    parts = read_contents(get(body, "contents"), model, version, images)
    texts = [part for part in parts if isinstance(part, str)]
    max_tokens = get(config, "max_output_tokens")
    return Prompted(
        model=model_id,
        spec=model,
        texts=texts,
        images=[part for part in parts if isinstance(part, ImageInput)],
        parts=tuple(parts),
        ask=Ask(
            prompt="\n".join(texts),
            system=system_text(get(body, "system_instruction")),
            response_mime_type=get(config, "response_mime_type"),
            schema=json_schema if json_schema is not None else schema,
            mask_shape=model.segmentation,
            mask_schema=model.mask_schema,
        ),
        media_resolution=resolution,
        max_output_tokens=int(max_tokens) if max_tokens is not None else None,
        thinking=thinks,
        thinking_budget=int(budget) if budget is not None else None,
        include_thoughts=bool(get(thinking, "include_thoughts", False)),
    )


def read_contents(
    contents: Any, model: Model, version: str, images: ImageReader
) -> list[str | ImageInput]:
    """The text and image parts of every content, in order."""
    if not contents:
        raise errors.invalid_argument(
            "* GenerateContentRequest.contents: contents is not specified",
            rule="contents.required",
            field="contents",
        )
    found: list[str | ImageInput] = []
    for i, content in enumerate(contents):
        parts = get(content, "parts")
        if not parts:
            raise errors.invalid_argument(
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.",
                rule="contents.required",
                field=f"contents[{i}].parts",
            )
        caption = None  # the text part right before an image says what it is
        for j, part in enumerate(parts):
            text, image = _read_part(part, f"contents[{i}].parts[{j}]", model, version, images)
            found.extend([text] if text is not None else [])
            if image is not None:
                image.caption = caption
                found.append(image)
            caption = text
    return found


def _read_part(
    part: dict[str, Any], where: str, model: Model, version: str, images: ImageReader
) -> tuple[str | None, ImageInput | None]:
    """The part's text and image; its own media resolution checked against the model."""
    text = get(part, "text")
    image = _read_image(part, where, images)
    resolution = _part_resolution(part, where, model, version)
    if image is not None:
        image.resolution = resolution
    return (text if isinstance(text, str) else None), image


def _part_resolution(part: dict[str, Any], where: str, model: Model, version: str) -> str | None:
    """The Part's mediaResolution.level: a model taking per-part resolution, on an API version
    its table entry lists (model_checks.check_part_version)."""
    setting = get(part, "media_resolution")
    level = model_checks.part_resolution(model, get(setting, "level"))
    if setting is not None:
        name = "media_resolution" if "media_resolution" in part else "mediaResolution"
        model_checks.check_part_version(model, version, where, name)
    return level


def _read_image(part: dict[str, Any], where: str, images: ImageReader) -> ImageInput | None:
    inline = get(part, "inline_data")
    if inline is not None:
        return images.inline(get(inline, "mime_type"), get(inline, "data"), f"{where}.inline_data")
    stored = get(part, "file_data")
    if stored is not None:
        return images.stored(
            get(stored, "mime_type"), get(stored, "file_uri"), f"{where}.file_data"
        )
    return None


def system_text(content: Any) -> str:
    parts = get(content, "parts", [])
    return "\n".join(text for p in parts if isinstance(text := get(p, "text"), str))


def with_output(prompt: Usage, outcome: ModelOutput) -> Usage:
    return replace(
        prompt, output_tokens=outcome.output_tokens, thoughts_tokens=outcome.thoughts_tokens
    )


def modalities(usage: Usage) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [{"modality": "TEXT", "tokenCount": usage.text_tokens}]
    if usage.image_tokens:
        details.append({"modality": "IMAGE", "tokenCount": usage.image_tokens})
    return details


def response_body(
    outcome: ModelOutput, usage: Usage, model_id: str, traffic_type: str | None = None
) -> dict[str, Any]:
    """A GenerateContentResponse (camelCase, as the service writes it; Vertex adds the
    `trafficType` of its usageMetadata)."""
    parts: list[dict[str, Any]] = []
    if outcome.thought_summary:
        parts.append({"text": outcome.thought_summary, "thought": True})
    parts.append({"text": outcome.text})
    metadata: dict[str, Any] = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": usage.output_tokens,
        "totalTokenCount": usage.total_tokens,
        "promptTokensDetails": modalities(usage),
    }
    if usage.cached_tokens:  # omitted when none, as the service omits zero counts
        metadata["cachedContentTokenCount"] = usage.cached_tokens
    if usage.thoughts_tokens:
        metadata["thoughtsTokenCount"] = usage.thoughts_tokens
    if traffic_type:
        metadata["trafficType"] = traffic_type
    candidate = {
        "content": {"parts": parts, "role": "model"},
        "finishReason": outcome.finish_reason,
        "index": 0,
    }
    return {
        "candidates": [candidate],
        "usageMetadata": metadata,
        "modelVersion": model_id,
        "responseId": secrets.token_urlsafe(16),
    }
