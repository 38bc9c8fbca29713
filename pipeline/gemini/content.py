"""Wire mapping of generateContent (`POST {base}/{version}/models/{model}:generateContent`).

Request: image parts in the request's order, each right after its caption's text part when it
has one, then the prompt's text part (the guide's generateContent order for one image: image,
then text; docs/gemini-api.md § Sending images); settings in `generationConfig`; a request
using a cached content (caches.py) names it in `cachedContent`. Answer:
candidates[0]'s text parts without `thought: true`, joined; its finishReason and finishMessage
carried through unchanged; promptFeedback.blockReason; usageMetadata (its
cachedContentTokenCount: the prompt tokens an implicit cache served, billed at the cached rate).

Continuation (the SDK's `Models._generate_content_with_continuation` with
`_extra_utils.should_continue_generation`): an answer whose candidates[0] carries a
`continuationToken` with finishReason CONTINUATION (or none) stopped at the service's
per-request decode limit; the same request is sent again with the token at its top level
(`continuationToken`), and the hops' parts are concatenated and their usage summed
(`merge_continuation_responses`). The SDK's generateContent loop stops only when no token comes
back; this client also stops when a hop hands back the token it was sent with, the Interactions
rule (`_next_unary_hop_token`), so a stuck answer cannot loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.gemini.types import GenerateRequest, GenerateResponse, ImagePart, Usage, total_usage
from pipeline.gemini.wire import Continuation, as_int, base64_text, field, hop_documents

RESUMABLE_FINISH_REASONS = (None, "CONTINUATION")
TRAFFIC_TYPE_CHARS = 64  # Vertex's enum names are ~25; a longer "trafficType" is not one


def _media_resolution_enum(level: str) -> str:
    return f"MEDIA_RESOLUTION_{level.upper()}"


def _image_part(image: ImagePart, request_wide_level: str | None) -> dict[str, Any]:
    if image.data is not None:
        part: dict[str, Any] = {
            "inline_data": {
                "mime_type": image.mime_type,
                "data": base64_text(image.data),  # copied into the body unescaped
            }
        }
    else:
        part = {"file_data": {"mime_type": image.mime_type, "file_uri": image.file_uri}}
    level = image.resolution or request_wide_level
    if level:
        part["mediaResolution"] = {"level": _media_resolution_enum(level)}
    return part


def _generation_config(request: GenerateRequest, per_part_level: bool) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if request.response_mime_type:
        config["responseMimeType"] = request.response_mime_type
    if request.response_schema is not None:
        config["responseSchema"] = request.response_schema
    if request.response_json_schema is not None:
        config["responseJsonSchema"] = request.response_json_schema
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        config["maxOutputTokens"] = request.max_output_tokens
    thinking: dict[str, Any] = {}
    if request.thinking_budget is not None:
        thinking["thinkingBudget"] = request.thinking_budget
    if request.thinking_level:
        thinking["thinkingLevel"] = request.thinking_level.upper()
    if thinking:
        config["thinkingConfig"] = thinking
    if request.media_resolution and not per_part_level:
        config["mediaResolution"] = _media_resolution_enum(request.media_resolution)
    return config


def build_generate_content_body(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of a generateContent call: image parts (each after its caption's text part,
    if any), then the prompt's text part.

    Part keys follow the guide's REST samples (`inline_data`, `file_data`, snake_case inside),
    which the service accepts alongside camelCase (docs/gemini-api.md § generateContent).
    `ultra_high` media resolution exists only per part, so a request-wide `ultra_high` is set on
    every image part instead of in generationConfig.
    """
    request_wide_level = "ultra_high" if request.media_resolution == "ultra_high" else None
    parts = image_parts(request.images, request_wide_level)
    parts.append({"text": request.prompt})
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}]}
    if request.system_instruction:
        body["systemInstruction"] = system_instruction(request.system_instruction)
    if request.cached_content:  # its system instruction and images are in the cache
        body["cachedContent"] = request.cached_content
    config = _generation_config(request, per_part_level=request_wide_level is not None)
    if config:
        body["generationConfig"] = config
    return body


def image_parts(images: Iterable[ImagePart], level: str | None = None) -> list[dict[str, Any]]:
    """Each image's part, right after its caption's text part when it has one; `level`: the
    media resolution of a part that sets none of its own."""
    parts: list[dict[str, Any]] = []
    for image in images:
        if image.caption:
            parts.append({"text": image.caption})
        parts.append(_image_part(image, level))
    return parts


def system_instruction(text: str) -> dict[str, Any]:
    return {"parts": [{"text": text}]}


def _usage_metadata(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    by_modality: dict[str, int] = {}
    for entry in field(meta, "promptTokensDetails", "prompt_tokens_details") or ():
        if isinstance(entry, dict) and entry.get("modality"):
            key = str(entry["modality"]).upper()
            count = as_int(field(entry, "tokenCount", "token_count"))
            by_modality[key] = by_modality.get(key, 0) + count
    return Usage(
        prompt_tokens=as_int(field(meta, "promptTokenCount", "prompt_token_count")),
        cached_tokens=as_int(field(meta, "cachedContentTokenCount", "cached_content_token_count")),
        output_tokens=as_int(field(meta, "candidatesTokenCount", "candidates_token_count")),
        thoughts_tokens=as_int(field(meta, "thoughtsTokenCount", "thoughts_token_count")),
        total_tokens=as_int(field(meta, "totalTokenCount", "total_token_count")),
        prompt_by_modality=by_modality,
        traffic_type=_traffic_type(field(meta, "trafficType", "traffic_type")),
    )


def _traffic_type(value: Any) -> str:
    """Vertex's trafficType as sent (an enum name); anything else (absent, hostile) is none."""
    if isinstance(value, str) and value.isascii() and len(value) <= TRAFFIC_TYPE_CHARS:
        return value
    return ""


def _candidate(document: dict[str, Any]) -> dict[str, Any]:
    candidates = document.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        return candidates[0]
    return {}


def _text(candidate: dict[str, Any]) -> str:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return "".join(
        part["text"]
        for part in parts or ()
        if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
    )


def _last(values: list[Any]) -> str | None:
    """The last value a hop set (a later hop overrides, as the SDK's merge does)."""
    present = [value for value in values if value]
    return str(present[-1]) if present else None


def parse_generate_content(body: str) -> GenerateResponse:
    """Read a GenerateContentResponse, or the JSON array of a continued one's hops (JSON text).

    Raises ValueError when it is neither. The finish reason is the last hop's.
    """
    hops = hop_documents(body, "a GenerateContentResponse")
    candidates = [_candidate(hop) for hop in hops]
    feedback = [field(hop, "promptFeedback", "prompt_feedback") for hop in hops]
    return GenerateResponse(
        text="".join(_text(candidate) for candidate in candidates),
        finish_reason=_last([field(candidates[-1], "finishReason", "finish_reason")]),
        block_reason=_last(
            [field(f, "blockReason", "block_reason") for f in feedback if isinstance(f, dict)]
        ),
        usage=total_usage(
            _usage_metadata(field(hop, "usageMetadata", "usage_metadata")) for hop in hops
        ),
        raw=body,
        finish_message=_last([field(candidates[-1], "finishMessage", "finish_message")]),
    )


def continuation_token(hop: dict[str, Any], sent: str | None) -> str | None:
    """`should_continue_generation`: the token of a hop cut at the decode limit, else None."""
    candidate = _candidate(hop)
    token = field(candidate, "continuationToken", "continuation_token")
    reason = field(candidate, "finishReason", "finish_reason")
    if not isinstance(token, str) or not token or token == sent:
        return None
    return token if reason in RESUMABLE_FINISH_REASONS else None


def continuation_body(body: dict[str, Any], token: str) -> dict[str, Any]:
    """The same request again with the token (`prepare_continuation_config`)."""
    return {**body, "continuationToken": token}


CONTINUATION = Continuation(continuation_token, continuation_body, parse_generate_content)
