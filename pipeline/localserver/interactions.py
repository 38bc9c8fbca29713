"""The Interactions surface: `POST /{version}/interactions`, `GET` and `DELETE .../{id}`.

A create body is held to the CreateModelInteraction tree (fields.py: snake_case only; settings in
`generation_config`, never `config`; no `thinking_budget`), the model must serve Interactions, the
settings must suit it (model_checks.py), and `response_format.schema` must be JSON Schema. Errors
have the Interactions shape (lowercase codes, no details; transport.py renders them).

Answers are `steps` (a `thought` step when the model thinks, then `model_output`) with `usage`;
with `--decode-limit` a long answer comes in `requires_continuation` hops (continuation.py).
Interactions are stored unless `store` is false, and can then be read back or deleted.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from aiohttp import web

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver import errors, model_checks
from pipeline.localserver.answering import Prompted
from pipeline.localserver.answers import Ask
from pipeline.localserver.billing import Usage, prompt_usage
from pipeline.localserver.caching import prefix_of
from pipeline.localserver.continuation import Continuations, Pending, Turn
from pipeline.localserver.core import Core
from pipeline.localserver.errors import ApiError
from pipeline.localserver.fields import CREATE_INTERACTION
from pipeline.localserver.files import rfc3339
from pipeline.localserver.image_input import INTERACTIONS_IMAGE_TYPES, ImageInput, ImageReader
from pipeline.localserver.spec import check
from pipeline.models import Model

STORED_INTERACTIONS = 256  # interactions kept for GET when store is true (oldest dropped)
CONTEXT_STEPS = ("model_output", "thought")  # earlier turns' steps: context, not a question


class InteractionsSurface:
    """Routes of the Interactions API, its stored interactions and pending continuations."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.continuations = Continuations(core.options.decode_limit)
        self._stored: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def routes(self, app: web.Application, version: str) -> None:
        app.router.add_post(f"/{version}/interactions", self.create)
        app.router.add_get(f"/{version}/interactions/{{id}}", self.get)
        app.router.add_delete(f"/{version}/interactions/{{id}}", self.delete)

    def snapshot(self) -> dict[str, Any]:
        return {
            "interactions_stored": len(self._stored),
            "continuations": {
                "issued": self.continuations.issued,
                "waiting": self.continuations.waiting,
            },
        }

    async def create(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        self.core.check_key(request)
        body = await self.core.body(request)
        check(body, CREATE_INTERACTION, version=version, interactions=True)
        model = self._model(body, version)
        token = body.get("continuation_token")
        echoed: list[dict[str, Any]] = []  # a continuation echoes no new content
        if token:
            turn = self._resumed(body, model, token)
        else:
            prompted, echoed = parse_interaction(body, model, self.core.images)
            turn = await self._answered(prompted)
        return web.json_response(self._deliver(turn, body, echoed))

    async def get(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        stored = self._stored.get(request.match_info["id"])
        if stored is None:
            raise errors.not_found(
                "Interaction not found (or created with store: false).",
                rule="interactions.not-found",
            )
        return web.json_response(stored)

    async def delete(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        if self._stored.pop(request.match_info["id"], None) is None:
            raise errors.not_found("Interaction not found.", rule="interactions.not-found")
        return web.json_response({})

    # ------------------------------------------------------------------------------ turns

    def _model(self, body: dict[str, Any], version: str) -> Model:
        model_id = body.get("model")
        if not model_id:
            raise errors.invalid_argument(
                "'model' is required (agents are not served here).", rule="interactions.required"
            )
        for flag in ("stream", "background"):
            if body.get(flag):
                raise errors.unsupported_here(f"'{flag}: true'")
        return model_checks.interactions_model(
            model_id, version, table=self.core.models, on=self.core.today()
        )

    async def _answered(self, prompted: Prompted) -> Turn:
        prompt = prompt_usage(prompted)
        outcome = await self.core.answer(prompted, prompt)
        return Turn(
            prompted.model,
            prompted.fingerprint(),
            prompt,
            outcome.text,
            outcome.finish_reason,
            outcome.thoughts_tokens,
            outcome.task,
            len(prompted.images),
            prefix_of(prompted),
        )

    def _resumed(self, body: dict[str, Any], model: Model, token: str) -> Turn:
        """The next hop of a pending answer; the token stays good if this hop is refused."""
        pending = self.continuations.take(token)
        try:
            self._check_continues(pending, body, model)
            self.core.admit(pending.rest.model, pending.rest.prompt)
        except ApiError:
            self.continuations.restore(token, pending)
            raise
        return pending.rest

    def _check_continues(self, pending: Pending, body: dict[str, Any], model: Model) -> None:
        """store: false re-sends the original body; store: true names the issuing hop."""
        same = str(body["model"]).removeprefix("models/") == pending.rest.model
        if body.get("store") is False or body.get("input") is not None:
            prompted, _ = parse_interaction(body, model, self.core.images)
            same = same and prompted.fingerprint() == pending.rest.fingerprint
        else:
            same = same and body.get("previous_interaction_id") == pending.interaction_id
        if not same:
            raise errors.invalid_argument(
                "The continuation_token does not belong to this request.",
                rule="interactions.continuation",
            )

    def _deliver(self, turn: Turn, body: dict[str, Any], echoed: list[Any]) -> dict[str, Any]:
        interaction_id = secrets.token_urlsafe(18)
        text, rest = self.continuations.split(turn.text)
        token = None
        if rest:
            token = self.continuations.issue(Pending.after(turn, rest, interaction_id))
        prompt = self.core.from_cache(turn.model, turn.prefix, turn.prompt)  # each hop re-sends
        usage = replace(prompt, output_tokens=text_tokens(text), thoughts_tokens=turn.thoughts)
        self.core.bill(turn.model, usage, turn.task, turn.images)
        interaction = resource(interaction_id, turn, text, usage, self.core.clock())
        if token:
            interaction["status"] = "requires_continuation"
            interaction["continuation_token"] = token
        if body.get("store", True) is not False:
            self._store(interaction, echoed)
        return interaction

    def _store(self, interaction: dict[str, Any], echoed: list[Any]) -> None:
        steps = interaction["steps"]
        if echoed:
            steps = [{"type": "user_input", "content": echoed}, *steps]
        self._stored[interaction["id"]] = {**interaction, "steps": steps}
        if len(self._stored) > STORED_INTERACTIONS:
            self._stored.popitem(last=False)


# ---------------------------------------------------------------------------- the wire


def parse_interaction(
    body: dict[str, Any], model: Model, images: ImageReader
) -> tuple[Prompted, list[dict[str, Any]]]:
    """A checked create body reduced to a Prompted, and its content items (to store)."""
    mime, schema = response_format(body)
    config = body.get("generation_config") or {}
    level = config.get("thinking_level")
    if level is not None:
        model_checks.check_level(model, level)
    items = input_items(body.get("input"))
    parts = _read_items(items, model, images)
    texts = [part for part in parts if isinstance(part, str)]
    max_tokens = config.get("max_output_tokens")
    prompted = Prompted(
        model=str(body["model"]).removeprefix("models/"),
        spec=model,
        texts=texts,
        images=[part for part in parts if isinstance(part, ImageInput)],
        parts=tuple(parts),
        ask=Ask(
            prompt="\n".join(texts),
            system=body.get("system_instruction") or "",
            response_mime_type=mime,
            schema=schema,
            mask_shape=model.segmentation,
            mask_schema=model.mask_schema,
        ),
        max_output_tokens=int(max_tokens) if max_tokens is not None else None,
        thinking=model_checks.thinks(model, None, level),
    )
    return prompted, items


def _read_items(
    items: list[dict[str, Any]], model: Model, images: ImageReader
) -> list[str | ImageInput]:
    """The text and image items, in order."""
    found: list[str | ImageInput] = []
    caption = None  # the text item right before an image says what it is
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if item["type"] == "text":
            found.append(item.get("text") or "")
        elif item["type"] == "image":
            image = _image(item, where, model, images)
            image.caption = caption
            found.append(image)
        else:
            raise errors.unsupported_here(f"'{item['type']}' content at '{where}'")
        caption = item.get("text") if item["type"] == "text" else None
    return found


def _image(item: dict[str, Any], where: str, model: Model, images: ImageReader) -> ImageInput:
    mime = item.get("mime_type")
    if item.get("uri") is not None:
        image = images.stored(mime, item["uri"], where, INTERACTIONS_IMAGE_TYPES)
    else:
        image = images.inline(mime, item.get("data"), where, INTERACTIONS_IMAGE_TYPES)
    image.resolution = model_checks.part_resolution(model, item.get("resolution"))
    return image


def input_items(value: Any) -> list[dict[str, Any]]:
    """Content items from a string, one item, a flat list of items (as the guide's Interactions
    samples send: docs/gemini-api.md § Interactions API), or steps (the SDK wraps items into one
    user_input step); earlier answers are context only."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    entries = [value] if isinstance(value, dict) else value or []
    items: list[dict[str, Any]] = []
    for entry in entries:
        if entry["type"] == "user_input":
            items.extend(entry.get("content") or [])
        elif entry["type"] not in CONTEXT_STEPS:
            items.append(entry)
    if not items:
        raise errors.invalid_argument("'input' is required.", rule="interactions.required")
    return items


def response_format(body: dict[str, Any]) -> tuple[str | None, Any]:
    """(response MIME type, JSON Schema) from response_format (one or a list of formats)."""
    mime = body.get("response_mime_type")
    formats: Iterable[Any] = body.get("response_format") or []
    if isinstance(formats, dict):
        formats = [formats]
    for entry in formats:
        if entry.get("type") == "text":
            schema = entry.get("schema")
            if schema is not None:
                model_checks.check_interactions_schema(schema, "response_format.schema")
            return entry.get("mime_type") or mime, schema
    return mime, None


def resource(
    interaction_id: str, turn: Turn, text: str, usage: Usage, now: float
) -> dict[str, Any]:
    """An Interaction resource for one hop (snake_case, as the API writes it)."""
    steps: list[dict[str, Any]] = []
    if turn.thoughts:
        steps.append({"type": "thought", "signature": secrets.token_urlsafe(24)})
    steps.append({"type": "model_output", "content": [{"type": "text", "text": text}]})
    stamp = rfc3339(now)
    return {
        "id": interaction_id,
        "object": "interaction",
        "model": turn.model,
        "status": "completed" if turn.finish == "STOP" else "incomplete",
        "created": stamp,
        "updated": stamp,
        "steps": steps,
        "usage": usage_body(usage),
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    by_modality = [{"modality": "text", "tokens": usage.text_tokens}]
    if usage.image_tokens:
        by_modality.append({"modality": "image", "tokens": usage.image_tokens})
    body: dict[str, Any] = {
        "total_input_tokens": usage.prompt_tokens,
        "input_tokens_by_modality": by_modality,
        "total_output_tokens": usage.output_tokens,
        "output_tokens_by_modality": [{"modality": "text", "tokens": usage.output_tokens}],
        "total_thought_tokens": usage.thoughts_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:  # the SDK's Usage.total_cached_tokens; left out when none
        body["total_cached_tokens"] = usage.cached_tokens
    return body
