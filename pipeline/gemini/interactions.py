"""Wire mapping of the Interactions API (`POST {base}/{version}/interactions`, seed 003).

Request: the SDK's shape, one `user_input` step holding the text item first and then the image
items (`data` base64 or `uri`, `mime_type`, optional `resolution`); settings in
`generation_config`; a `response_format` of type text carrying `mime_type` and a JSON Schema in
`schema`; always `"store": false`, because the service otherwise keeps every interaction for
days and a batch tool must not leave thousands of stored prompts behind.

Answer: the text of the last `model_output` step (`thought` steps skipped) and `usage`.
The interaction's `status` becomes a generateContent-style finish reason so the pipeline treats
both flavours alike:

    completed                                        -> STOP
    incomplete, requires_continuation, budget_exceeded -> MAX_TOKENS (output cut short)
    failed, cancelled                                -> OTHER
    anything else (in_progress, queued, ...)         -> None (not finished)
"""

from __future__ import annotations

import base64
import json
from typing import Any

from pipeline.gemini.types import GenerateRequest, GenerateResponse, Usage
from pipeline.gemini.wire import as_int

FINISH_REASON_BY_STATUS = {
    "completed": "STOP",
    "incomplete": "MAX_TOKENS",
    "requires_continuation": "MAX_TOKENS",
    "budget_exceeded": "MAX_TOKENS",
    "failed": "OTHER",
    "cancelled": "OTHER",
}


def build_interaction_body(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of an Interactions call for `request`.

    Interactions has no thinking budget (only `thinking_level`), so `thinking_budget` is not
    sent; `media_resolution` has no request-wide field there and becomes each image's
    `resolution` unless the image sets its own.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt}]
    for image in request.images:
        item: dict[str, Any] = {"type": "image", "mime_type": image.mime_type}
        if image.data is not None:
            item["data"] = base64.b64encode(image.data).decode("ascii")
        else:
            item["uri"] = image.file_uri
        resolution = image.resolution or request.media_resolution
        if resolution:
            item["resolution"] = resolution
        content.append(item)

    body: dict[str, Any] = {
        "model": request.model.removeprefix("models/"),
        "input": [{"type": "user_input", "content": content}],
        "store": False,
    }
    if request.system_instruction:
        body["system_instruction"] = request.system_instruction
    if request.response_mime_type:
        response_format: dict[str, Any] = {"type": "text", "mime_type": request.response_mime_type}
        schema = request.response_json_schema or request.response_schema
        if schema is not None:
            response_format["schema"] = schema
        body["response_format"] = response_format
    config: dict[str, Any] = {}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        config["max_output_tokens"] = request.max_output_tokens
    if request.thinking_level:
        config["thinking_level"] = request.thinking_level.lower()
    if config:
        body["generation_config"] = config
    return body


def _answer_text(steps: Any) -> str:
    """Text items of the last model_output step, joined; "" when the model said nothing."""
    if not isinstance(steps, list):
        return ""
    for step in reversed(steps):
        if not isinstance(step, dict) or step.get("type") != "model_output":
            continue  # thought steps (and tool steps) are not the answer
        items = step.get("content")
        if not isinstance(items, list):
            return ""
        return "".join(
            str(item.get("text", ""))
            for item in items
            if isinstance(item, dict) and item.get("type") == "text"
        )
    return ""


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    by_modality: dict[str, int] = {}
    for entry in usage.get("input_tokens_by_modality") or ():
        if isinstance(entry, dict) and entry.get("modality"):
            # Upper case like generateContent's promptTokensDetails ("IMAGE", "TEXT").
            key = str(entry["modality"]).upper()
            by_modality[key] = by_modality.get(key, 0) + as_int(entry.get("tokens"))
    return Usage(
        prompt_tokens=as_int(usage.get("total_input_tokens")),
        output_tokens=as_int(usage.get("total_output_tokens")),
        thoughts_tokens=as_int(usage.get("total_thought_tokens")),
        total_tokens=as_int(usage.get("total_tokens")),
        prompt_by_modality=by_modality,
    )


def parse_interaction(body: str) -> GenerateResponse:
    """Read an Interaction resource (JSON text); raises ValueError when it is not one."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("an Interaction must be a JSON object")
    status = document.get("status")
    return GenerateResponse(
        text=_answer_text(document.get("steps")),
        finish_reason=FINISH_REASON_BY_STATUS.get(str(status)) if status else None,
        block_reason=None,  # Interactions reports blocks through status and errors, not a field
        usage=_usage(document.get("usage")),
        raw=body,
    )
