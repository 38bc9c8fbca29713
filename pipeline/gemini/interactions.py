"""Wire mapping of the Interactions API (`POST {base}/{version}/interactions`:
docs/gemini-api.md § Interactions API).

Request: the SDK's shape, one `user_input` step holding the prompt's text item first (the order
of the guide's Interactions edition, "Tips and best practices":
https://ai.google.dev/gemini-api/docs/interactions/image-understanding) and then the image items
in the request's order (`data` base64 or `uri`, `mime_type`, optional `resolution`), each right
after its caption's text item when it has one; settings in `generation_config` (there is no
thinking budget here: a request carrying one is refused with ValueError rather than sent without
it); a `response_format` of type text carrying `mime_type` and a JSON Schema in `schema` (an
OpenAPI-subset `response_schema` is converted, schema.py); always `"store": false`, because the
service otherwise keeps every interaction for days and a batch tool must not leave thousands of
stored prompts behind.

Answer (the SDK's `_output_properties_from_steps` and `_normalize_interaction_shape`, in
`_gaos/google_genai.py`): the text of all *trailing* `model_output` steps joined — walking back
from the end, `thought` steps are skipped, the walk stops at a `user_input` step or at any other
step (or non-text item) once text was found. Older answers carry `outputs` (content items)
instead of `steps`; they read as one `model_output` step. A step's `error` (a google.rpc.Status)
and the interaction's `errors` become `finish_message`; an error whose code is a blocked-
generation code (`safety`, `recitation`, `language`, `prohibited_content`, `spii`, `blocklist`,
`image_*`, `content_blocked`) becomes the finish reason, upper-cased (SAFETY, ..., IMAGE_SAFETY,
CONTENT_BLOCKED). Otherwise the final hop's `status` becomes a generateContent finish reason:

    completed                    -> STOP
    incomplete, budget_exceeded  -> MAX_TOKENS (output cut short by max_output_tokens/budget)
    requires_continuation        -> CONTINUATION (cut at the per-request decode limit and not
                                    continued: the client continues such answers, so this is
                                    seen only when it stopped early, see client.py)
    failed, cancelled            -> OTHER
    anything else (in_progress, queued, requires_action, ...) -> None (not finished)

Continuation (`_interactions_continuation.py`: `continue_async_unary_interaction`,
`_next_unary_hop_token`, `_continuation_body`, `merge_unary_hops`): a hop with `status:
"requires_continuation"` and a `continuation_token` is followed by the original body plus
`continuation_token` (with `store: false` the input is re-sent, no previous_interaction_id); a hop
that hands back the token it was sent with ends the loop. The hops' steps are concatenated (a
later hop's leading `user_input` steps dropped) and their usage summed.
"""

from __future__ import annotations

from typing import Any

from pipeline.gemini.errors import is_blocked_code
from pipeline.gemini.schema import json_schema
from pipeline.gemini.types import GenerateRequest, GenerateResponse, Usage, total_usage
from pipeline.gemini.wire import Continuation, as_int, base64_text, hop_documents

FINISH_REASON_BY_STATUS = {
    "completed": "STOP",
    "incomplete": "MAX_TOKENS",
    "budget_exceeded": "MAX_TOKENS",
    "requires_continuation": "CONTINUATION",
    "failed": "OTHER",
    "cancelled": "OTHER",
}
CONTINUE_STATUS = "requires_continuation"


def _content(request: GenerateRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt}]
    for image in request.images:
        if image.caption:
            content.append({"type": "text", "text": image.caption})
        item: dict[str, Any] = {"type": "image", "mime_type": image.mime_type}
        if image.data is not None:
            item["data"] = base64_text(image.data)
        else:
            item["uri"] = image.file_uri
        resolution = image.resolution or request.media_resolution
        if resolution:
            item["resolution"] = resolution
        content.append(item)
    return content


def _generation_config(request: GenerateRequest) -> dict[str, Any]:
    if request.thinking_budget is not None:
        raise ValueError(
            "the Interactions API has no thinking budget (only thinking_level): "
            f"thinking_budget={request.thinking_budget} cannot be sent"
        )
    config: dict[str, Any] = {}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        config["max_output_tokens"] = request.max_output_tokens
    if request.thinking_level:
        config["thinking_level"] = request.thinking_level.lower()
    return config


def build_interaction_body(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of an Interactions call for `request`; ValueError for a thinking budget,
    or a cached content (the caching page: "The Interactions API only supports implicit
    caching").

    `media_resolution` has no request-wide field here and becomes each image's `resolution`
    unless the image sets its own.
    """
    if request.cached_content:
        raise ValueError("Interactions takes no cached content: use generateContent")
    config = _generation_config(request)
    body: dict[str, Any] = {
        "model": request.model.removeprefix("models/"),
        "input": [{"type": "user_input", "content": _content(request)}],
        "store": False,
    }
    if request.system_instruction:
        body["system_instruction"] = request.system_instruction
    if request.response_mime_type:
        response_format: dict[str, Any] = {"type": "text", "mime_type": request.response_mime_type}
        if request.response_json_schema is not None:
            response_format["schema"] = request.response_json_schema
        elif request.response_schema is not None:
            response_format["schema"] = json_schema(request.response_schema)
        body["response_format"] = response_format
    if config:
        body["generation_config"] = config
    return body


def _steps(hop: dict[str, Any]) -> list[Any]:
    """A hop's steps; the legacy `outputs` list reads as one model_output step."""
    steps = hop.get("steps")
    if isinstance(steps, list):
        return steps
    outputs = hop.get("outputs")
    return [{"type": "model_output", "content": outputs}] if isinstance(outputs, list) else []


def _merged_steps(hops: list[dict[str, Any]]) -> list[Any]:
    steps = list(_steps(hops[0]))
    for hop in hops[1:]:
        later = _steps(hop)
        start = 0
        while start < len(later) and _type(later[start]) == "user_input":
            start += 1  # a later hop continues the same turn: its repeated input is not output
        steps.extend(later[start:])
    return steps


def _type(step: Any) -> Any:
    return step.get("type") if isinstance(step, dict) else None


def _trailing_outputs(steps: list[Any]) -> list[dict[str, Any]]:
    """The model_output steps after the last user_input, thought steps skipped, newest first."""
    outputs: list[dict[str, Any]] = []
    for step in reversed(steps):
        kind = _type(step)
        if kind == "user_input":
            break
        if kind == "model_output":
            outputs.append(step)
    return outputs


def _answer_text(steps: list[Any]) -> str:
    """The trailing text of the answer, as the SDK's `output_text` reads it."""
    pieces: list[str] = []
    for step in reversed(steps):
        kind = _type(step)
        if kind == "user_input":
            break
        if kind == "thought":
            continue
        if kind != "model_output":
            if pieces:
                break
            continue
        items = step.get("content")
        if isinstance(items, list) and _collect_text(items, pieces):
            break
    return "".join(reversed(pieces))


def _collect_text(items: list[Any], pieces: list[str]) -> bool:
    """Add the trailing text items (newest first); True when a non-text item ended the text."""
    for item in reversed(items):
        if _type(item) != "text":
            if pieces:
                return True
            continue
        text = item.get("text")
        pieces.append(text if isinstance(text, str) else "")
    return False


def _errors(hop: dict[str, Any], steps: list[Any]) -> list[dict[str, Any]]:
    """Errors reported on the answer's own steps, then on the interaction."""
    found = [step.get("error") for step in _trailing_outputs(steps)]
    listed = hop.get("errors")
    found += listed if isinstance(listed, list) else []
    return [error for error in found if isinstance(error, dict)]


def _describe(error: dict[str, Any]) -> str:
    code, message = error.get("code"), error.get("message")
    return ": ".join(str(part) for part in (code, message) if part not in (None, "")) or "error"


def _blocked_reason(errors: list[dict[str, Any]]) -> str | None:
    for error in errors:
        code = error.get("code")
        if isinstance(code, str) and is_blocked_code(code.lower()):
            return code.upper()
    return None


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
        # the SDK's Interactions `Usage.total_cached_tokens` (google-genai 3.6,
        # google/genai/_gaos/types/interactions/usage.py): "tokens in the cached part of the prompt"
        cached_tokens=as_int(usage.get("total_cached_tokens")),
        output_tokens=as_int(usage.get("total_output_tokens")),
        thoughts_tokens=as_int(usage.get("total_thought_tokens")),
        total_tokens=as_int(usage.get("total_tokens")),
        prompt_by_modality=by_modality,
    )


def parse_interaction(body: str) -> GenerateResponse:
    """Read an Interaction, or the JSON array of a continued one's hops (JSON text).

    Raises ValueError when it is neither.
    """
    hops = hop_documents(body, "an Interaction")
    final = hops[-1]
    steps = _merged_steps(hops)
    errors = _errors(final, steps)
    status = final.get("status")
    finish_reason = _blocked_reason(errors) or FINISH_REASON_BY_STATUS.get(str(status))
    return GenerateResponse(
        text=_answer_text(steps),
        finish_reason=finish_reason,
        block_reason=None,  # Interactions reports blocks through status and errors, not a field
        usage=total_usage(_usage(hop.get("usage")) for hop in hops),
        raw=body,
        finish_message="; ".join(_describe(error) for error in errors) or None,
    )


def continuation_token(hop: dict[str, Any], sent: str | None) -> str | None:
    """`_next_unary_hop_token`: the token of a hop cut at the decode limit, else None."""
    token = hop.get("continuation_token")
    if hop.get("status") != CONTINUE_STATUS or not isinstance(token, str) or not token:
        return None
    return None if token == sent else token


def continuation_body(body: dict[str, Any], token: str) -> dict[str, Any]:
    """`_continuation_body` with store false: the original body (input included) plus token."""
    return {**body, "continuation_token": token}


CONTINUATION = Continuation(continuation_token, continuation_body, parse_interaction)
