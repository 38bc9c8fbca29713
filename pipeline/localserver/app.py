"""The HTTP surface: the real API's paths and JSON under /v1beta and /v1, on aiohttp.web.

generateContent (and countTokens), the Interactions API, the Files API with its resumable upload
protocol, and GET /local/stats. Field names are read in camelCase or snake_case at every level,
as the real service accepts both (the SDK itself mixes them).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.localserver import errors
from pipeline.localserver.answers import Answer, Ask, caption, render
from pipeline.localserver.errors import ApiError
from pipeline.localserver.faults import Faults, Replay, apply_to_text
from pipeline.localserver.files import MAX_FILE_BYTES, FileStore, StoredFile, UploadSession, rfc3339
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.quotas import Quotas
from pipeline.localserver.vision import Analysis, ImageDecodeError, analyse, open_image
from pipeline.models import lookup

SUPPORTED_IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}
)
MODEL_PREFIXES = ("gemini", "gemma")
ANALYSIS_CACHE_SIZE = 256  # recent images' analyses, by sha256 (benchmarks resend images)
STORED_INTERACTIONS = 256  # interactions kept for GET when store is true (oldest dropped)
SHUTDOWN_GRACE_SECONDS = 2.0
_URLSAFE = str.maketrans("-_", "+/")
_FILE_NAME = re.compile(r"(?:^|/)files/([a-z0-9][a-z0-9-]{0,39})$")
_RESOLUTION = re.compile(r"^(?:media_resolution_)?(low|medium|high|ultra_high|unspecified)$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def get(obj: Any, snake: str, default: Any = None) -> Any:
    """obj[snake] or obj[camelCase of snake]: the service takes either spelling."""
    if not isinstance(obj, dict):
        return default
    value = obj.get(snake)
    if value is None:
        value = obj.get(_camel(snake))
    return default if value is None else value


_CAMEL: dict[str, str] = {}


def _camel(snake: str) -> str:
    camel = _CAMEL.get(snake)
    if camel is None:
        head, *rest = snake.split("_")
        camel = _CAMEL[snake] = head + "".join(word.title() for word in rest)
    return camel


@dataclass(slots=True)
class ImageInput:
    """One image of a request, checked and measured."""

    image: Image.Image  # header read; pixels decoded only when an answer needs them
    mime_type: str
    sha256: str
    resolution: str | None  # per-image media resolution (Gemini 3)


@dataclass(slots=True)
class Prompted:
    """A request reduced to what answering and billing need, from either API flavour."""

    model: str
    texts: list[str]
    images: list[ImageInput]
    ask: Ask
    media_resolution: str | None = None  # request-wide (generationConfig.mediaResolution)
    max_output_tokens: int | None = None
    thinking: bool = False
    thinking_budget: int | None = None
    include_thoughts: bool = False
    image_token_counts: list[int] = field(default_factory=list)  # set by Service._bill_prompt
    text_token_count: int = 0

    @property
    def prompt_token_count(self) -> int:
        return self.text_token_count + sum(self.image_token_counts)


@dataclass(slots=True)
class Outcome:
    text: str
    finish_reason: str  # STOP | MAX_TOKENS
    output_tokens: int
    thoughts_tokens: int
    thought_summary: str | None


class Stats:
    """Counters for GET /local/stats."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, int]] = {}
        self.by_status: dict[str, int] = {}
        self.tokens = {"prompt": 0, "output": 0, "thoughts": 0, "total": 0}
        self.tokens_by_modality = {"TEXT": 0, "IMAGE": 0}
        self.images = 0
        self.answers: dict[str, int] = {}

    def count(self, key: str, status: int) -> None:
        code = str(status)
        per_path = self.requests.setdefault(key, {})
        per_path[code] = per_path.get(code, 0) + 1
        self.by_status[code] = self.by_status.get(code, 0) + 1

    def bill(self, prompted: Prompted, outcome: Outcome, task: str) -> None:
        prompt = prompted.prompt_token_count
        self.tokens["prompt"] += prompt
        self.tokens["output"] += outcome.output_tokens
        self.tokens["thoughts"] += outcome.thoughts_tokens
        self.tokens["total"] += prompt + outcome.output_tokens + outcome.thoughts_tokens
        self.tokens_by_modality["TEXT"] += prompted.text_token_count
        self.tokens_by_modality["IMAGE"] += sum(prompted.image_token_counts)
        self.images += len(prompted.images)
        self.answers[task] = self.answers.get(task, 0) + 1


class Service:
    """All state and handlers of one server."""

    def __init__(self, options: ServerOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self.clock = clock
        self.files = FileStore(clock, options.file_processing_seconds, options.file_ttl_seconds)
        self.quotas = Quotas(
            options.rpm, options.tpm, options.rpd, clock, options.quota_window_seconds
        )
        self.faults = Faults(options.fault_rate, options.seed, options.latency_ms)
        self.replay = Replay(options.replay) if options.replay else None
        self.stats = Stats()
        self._analyses: OrderedDict[str, Analysis] = OrderedDict()
        self._interactions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.closing = asyncio.Event()

    # wiring

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._count],
            client_max_size=self.options.inline_limit_bytes + 1,
        )
        version = "{version:v1|v1beta}"
        app.router.add_post(f"/{version}/models/{{model_action}}", self.model_method)
        app.router.add_post(f"/{version}/interactions", self.create_interaction)
        app.router.add_get(f"/{version}/interactions/{{id}}", self.get_interaction)
        app.router.add_delete(f"/{version}/interactions/{{id}}", self.delete_interaction)
        app.router.add_post(f"/upload/{version}/files", self.upload)
        app.router.add_get(f"/{version}/files", self.list_files)
        app.router.add_get(f"/{version}/files/{{id}}", self.get_file)
        app.router.add_delete(f"/{version}/files/{{id}}", self.delete_file)
        app.router.add_get("/local/stats", self.local_stats)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer ("client closed request")
            raise
        finally:
            if request.path != "/local/stats":  # reading the counters does not change them
                self.stats.count(_stat_key(request), status)

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "requests": {k: dict(v) for k, v in stats.requests.items()},
            "requests_total": sum(stats.by_status.values()),
            "responses_by_status": dict(stats.by_status),
            "answers_by_task": dict(stats.answers),
            "images": stats.images,
            "tokens": {**stats.tokens, "prompt_by_modality": dict(stats.tokens_by_modality)},
            "uploads": {
                "started": self.files.uploads_started,
                "completed": self.files.uploads_completed,
                "bytes": self.files.bytes_received,
            },
            "files": {"stored": self.files.count, "deleted": self.files.deleted},
            "interactions_stored": len(self._interactions),
            "quota_rejections": dict(self.quotas.rejections),
            "faults": dict(self.faults.injected),
            "replayed": self.replay.served if self.replay else 0,
        }

    async def local_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    # auth and bodies

    def _check_key(self, request: web.Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            raise errors.missing_key()
        expected = self.options.api_key
        if expected is not None and not hmac.compare_digest(
            key.encode("utf-8"), expected.encode("utf-8")
        ):
            raise errors.invalid_key()

    async def _json_body(self, request: web.Request, *, required: bool = True) -> dict[str, Any]:
        limit = self.options.inline_limit_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.payload_too_large(limit)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.payload_too_large(limit) from None
        if not raw.strip() and not required:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise errors.invalid_argument(
                "Invalid JSON payload received. Unexpected token or malformed JSON."
            ) from None
        if not isinstance(body, dict):
            raise errors.invalid_argument(
                "Invalid JSON payload received. Expected an object at the top level."
            )
        return body

    def _check_model(self, model: str, version: str, method: str) -> str:
        model = model.removeprefix("models/")
        if not model.lower().startswith(MODEL_PREFIXES):
            raise errors.model_not_found(model, version, method)
        return model

    # images

    def _image(
        self,
        mime_type: Any,
        data: Any,
        uri: Any,
        resolution: Any,
        where: str,
    ) -> ImageInput:
        if uri is not None:
            stored = self._active_file(str(uri))
            raw = stored.data
            mime = str(mime_type or stored.mime_type)
            digest = stored.sha256
        else:
            if not isinstance(data, str):
                raise errors.invalid_argument(f"'{where}.data' is required.", f"{where}.data")
            mime = str(mime_type or "")
            if not mime:
                raise errors.invalid_argument(
                    f"'{where}.mime_type' is required.", f"{where}.mime_type"
                )
            decoded = _b64decode(data)
            if decoded is None:
                raise errors.bad_base64(f"{where}.data")
            raw = decoded
            digest = ""
        mime = mime.lower()
        if mime not in SUPPORTED_IMAGE_TYPES:
            raise errors.unsupported_mime(mime)
        try:
            image = open_image(raw)
        except ImageDecodeError:
            raise errors.undecodable_image() from None
        return ImageInput(
            image=image,
            mime_type=mime,
            sha256=digest or hashlib.sha256(raw).hexdigest(),
            resolution=_resolution(resolution, where),
        )

    def _active_file(self, uri: str) -> StoredFile:
        match = _FILE_NAME.search(uri)
        file_id = match.group(1) if match else uri.rsplit("/", 1)[-1]
        stored = self.files.get(file_id) if match else None
        if stored is None:
            raise errors.file_not_found(file_id)
        if self.files.state(stored) != "ACTIVE":
            raise errors.file_not_active(file_id)
        return stored

    def _analysis(self, image: ImageInput) -> Analysis:
        cached = self._analyses.get(image.sha256)
        if cached is not None:
            self._analyses.move_to_end(image.sha256)
            return cached
        try:
            analysis = analyse(image.image)
        except ImageDecodeError:
            raise errors.undecodable_image() from None
        self._analyses[image.sha256] = analysis
        if len(self._analyses) > ANALYSIS_CACHE_SIZE:
            self._analyses.popitem(last=False)
        return analysis

    def _bill_prompt(self, prompted: Prompted) -> None:
        """Input tokens by the documented rules of the model's family (pipeline.gemini.tokens)."""
        prompted.text_token_count = sum(text_tokens(t) for t in prompted.texts) + text_tokens(
            prompted.ask.system
        )
        try:
            prompted.image_token_counts = [
                image_tokens(
                    prompted.model,
                    image.image.width,
                    image.image.height,
                    image.resolution or prompted.media_resolution,
                )
                for image in prompted.images
            ]
        except ValueError as exc:
            raise errors.invalid_argument(str(exc)) from None

    # answering, shared by both API flavours

    async def _answer(self, prompted: Prompted) -> tuple[Outcome, str]:
        draw = self.faults.draw(self._request_key(prompted)) if self.faults.active else None
        replayed = self.replay.answer([i.sha256 for i in prompted.images]) if self.replay else None
        analysis = None
        if replayed is not None:
            answer = Answer(replayed[0], "replay")
            finish = replayed[1]
        else:
            analysis = self._analysis(prompted.images[0]) if prompted.images else None
            answer = render(prompted.ask, analysis)
            finish = "STOP"
        text = answer.text
        if draw is not None:
            if draw.latency_seconds:
                await asyncio.sleep(draw.latency_seconds)
            if draw.faulty:
                kind = self.faults.choose(draw, answer)
                if kind == "http_500":
                    raise errors.internal()
                if kind == "http_503":
                    raise errors.unavailable()
                if kind == "hang":
                    await self._hang()
                    raise errors.deadline_exceeded()
                text, finish = apply_to_text(kind, answer)
        output_tokens = text_tokens(text)
        limit = prompted.max_output_tokens
        if limit is not None and limit > 0 and output_tokens > limit:
            text = text.encode("utf-8")[: limit * 4].decode("utf-8", "ignore")
            output_tokens = text_tokens(text)
            finish = "MAX_TOKENS"
        thoughts = 0
        summary = None
        if prompted.thinking:
            # The local model does not think; it bills as much thought as answer (capped by the
            # budget) so thinking's cost shows up in usage the way it does on the real service.
            thoughts = output_tokens
            if prompted.thinking_budget is not None and prompted.thinking_budget > 0:
                thoughts = min(thoughts, prompted.thinking_budget)
            if prompted.include_thoughts:
                seen = caption(analysis) if analysis else "Recalling what was asked."
                summary = f"**Looking at the image**\n\n{seen}"
        outcome = Outcome(text, finish, output_tokens, thoughts, summary)
        self.stats.bill(prompted, outcome, answer.task)
        return outcome, answer.task

    def _request_key(self, prompted: Prompted) -> bytes:
        digest = hashlib.sha256(prompted.model.encode())
        for text in (*prompted.texts, prompted.ask.system):
            digest.update(b"\0" + text.encode("utf-8"))
        for image in prompted.images:
            digest.update(b"\1" + image.sha256.encode("ascii"))
        return digest.digest()

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.options.hang_seconds)

    def _polygon_masks(self, model: str) -> bool:
        return lookup(model).segmentation == "polygon"

    # generateContent / countTokens

    async def model_method(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        model, _, method = request.match_info["model_action"].rpartition(":")
        try:
            self._check_key(request)
            if method not in ("generateContent", "countTokens") or not model:
                raise errors.not_found(f"Method '{method}' is not served by the local server.")
            model = self._check_model(model, version, method)
            body = await self._json_body(request)
            if method == "countTokens" and "generate_content_request" in body:
                body = body["generate_content_request"]
            elif method == "countTokens" and "generateContentRequest" in body:
                body = body["generateContentRequest"]
            prompted = self._parse_generate(model, body)
            self._bill_prompt(prompted)
            if method == "countTokens":
                return web.json_response(
                    {
                        "totalTokens": prompted.prompt_token_count,
                        "promptTokensDetails": _modalities(prompted),
                    }
                )
            self.quotas.admit(model, prompted.prompt_token_count)
            outcome, _ = await self._answer(prompted)
        except ApiError as exc:
            return _google_error(exc)
        parts: list[dict[str, Any]] = []
        if outcome.thought_summary:
            parts.append({"text": outcome.thought_summary, "thought": True})
        parts.append({"text": outcome.text})
        usage: dict[str, Any] = {
            "promptTokenCount": prompted.prompt_token_count,
            "candidatesTokenCount": outcome.output_tokens,
            "totalTokenCount": prompted.prompt_token_count
            + outcome.output_tokens
            + outcome.thoughts_tokens,
            "promptTokensDetails": _modalities(prompted),
        }
        if outcome.thoughts_tokens:
            usage["thoughtsTokenCount"] = outcome.thoughts_tokens
        return web.json_response(
            {
                "candidates": [
                    {
                        "content": {"parts": parts, "role": "model"},
                        "finishReason": outcome.finish_reason,
                        "index": 0,
                    }
                ],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": secrets.token_urlsafe(16),
            }
        )

    def _parse_generate(self, model: str, body: dict[str, Any]) -> Prompted:
        contents = get(body, "contents")
        if not contents:
            raise errors.invalid_argument(
                "* GenerateContentRequest.contents: contents is not specified", "contents"
            )
        if isinstance(contents, dict):
            contents = [contents]
        if not isinstance(contents, list):
            raise errors.invalid_argument("contents must be a list of Content.", "contents")
        texts: list[str] = []
        images: list[ImageInput] = []
        for i, content in enumerate(contents):
            parts = get(content, "parts")
            if not isinstance(parts, list) or not parts:
                raise errors.invalid_argument(
                    f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be "
                    "empty.",
                    f"contents[{i}].parts",
                )
            for j, part in enumerate(parts):
                self._read_part(part, f"contents[{i}].parts[{j}]", texts, images)
        config = get(body, "generation_config", {})
        thinking_config = get(config, "thinking_config", {})
        budget = get(thinking_config, "thinking_budget")
        level = get(thinking_config, "thinking_level")
        return Prompted(
            model=model,
            texts=texts,
            images=images,
            ask=Ask(
                prompt="\n".join(texts),
                system=_system_text(get(body, "system_instruction")),
                response_mime_type=get(config, "response_mime_type"),
                schema=get(config, "response_json_schema") or get(config, "response_schema"),
                polygon_masks=self._polygon_masks(model),
            ),
            media_resolution=_resolution(
                get(config, "media_resolution"), "generationConfig.mediaResolution"
            ),
            max_output_tokens=_int_or_none(get(config, "max_output_tokens")),
            thinking=_thinks(model, budget, level),
            thinking_budget=_int_or_none(budget),
            include_thoughts=bool(get(thinking_config, "include_thoughts", False)),
        )

    def _read_part(self, part: Any, where: str, texts: list[str], images: list[ImageInput]) -> None:
        if not isinstance(part, dict):
            raise errors.invalid_argument(f"'{where}' must be a Part object.", where)
        text = part.get("text")
        if isinstance(text, str):
            texts.append(text)
        resolution = get(part, "media_resolution")
        inline = get(part, "inline_data")
        if inline is not None:
            images.append(
                self._image(
                    get(inline, "mime_type"),
                    inline.get("data") if isinstance(inline, dict) else None,
                    None,
                    resolution,
                    f"{where}.inline_data",
                )
            )
        file_data = get(part, "file_data")
        if file_data is not None:
            uri = get(file_data, "file_uri")
            if not uri:
                raise errors.invalid_argument(
                    f"'{where}.file_data.file_uri' is required.", f"{where}.file_data.file_uri"
                )
            images.append(
                self._image(
                    get(file_data, "mime_type"), None, uri, resolution, f"{where}.file_data"
                )
            )

    # Interactions API

    async def create_interaction(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        try:
            self._check_key(request)
            body = await self._json_body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise errors.invalid_argument("'model' is required (no agents are served here).")
            model = self._check_model(model, version, "interactions")
            for unsupported in ("stream", "background"):
                if body.get(unsupported):
                    raise errors.invalid_argument(
                        f"'{unsupported}: true' is not supported by the local server."
                    )
            prompted, echoed = self._parse_interaction(model, body)
            self._bill_prompt(prompted)
            self.quotas.admit(model, prompted.prompt_token_count)
            outcome, _ = await self._answer(prompted)
        except ApiError as exc:
            return _interactions_error(exc)
        now = rfc3339(self.clock())
        steps: list[dict[str, Any]] = []
        if outcome.thoughts_tokens:
            steps.append({"type": "thought", "signature": secrets.token_urlsafe(24)})
        steps.append({"type": "model_output", "content": [{"type": "text", "text": outcome.text}]})
        prompt_tokens = prompted.prompt_token_count
        interaction = {
            "id": secrets.token_urlsafe(18),
            "object": "interaction",
            "model": model,
            "status": "completed" if outcome.finish_reason == "STOP" else "incomplete",
            "created": now,
            "updated": now,
            "steps": steps,
            "usage": {
                "total_input_tokens": prompt_tokens,
                "input_tokens_by_modality": [
                    {"modality": m["modality"].lower(), "tokens": m["tokenCount"]}
                    for m in _modalities(prompted)
                ],
                "total_output_tokens": outcome.output_tokens,
                "output_tokens_by_modality": [
                    {"modality": "text", "tokens": outcome.output_tokens}
                ],
                "total_thought_tokens": outcome.thoughts_tokens,
                "total_tokens": prompt_tokens + outcome.output_tokens + outcome.thoughts_tokens,
            },
        }
        if body.get("store", True) is not False:
            self._interactions[interaction["id"]] = {
                **interaction,
                "steps": [{"type": "user_input", "content": echoed}, *steps],
            }
            if len(self._interactions) > STORED_INTERACTIONS:
                self._interactions.popitem(last=False)
        return web.json_response(interaction)

    def _parse_interaction(
        self, model: str, body: dict[str, Any]
    ) -> tuple[Prompted, list[dict[str, Any]]]:
        items = _interaction_items(body.get("input"))
        texts: list[str] = []
        images: list[ImageInput] = []
        for index, item in enumerate(items):
            kind = item.get("type", "text" if "text" in item else None)
            where = f"input[{index}]"
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise errors.invalid_argument(f"'{where}.text' must be a string.")
                texts.append(text)
            elif kind == "image":
                images.append(
                    self._image(
                        get(item, "mime_type"),
                        item.get("data"),
                        item.get("uri"),
                        item.get("resolution"),
                        where,
                    )
                )
            else:
                raise errors.invalid_argument(
                    f"The value '{kind}' is not supported for 'type' at '{where}'."
                )
        mime, schema = _response_format(body)
        config = get(body, "generation_config") or body.get("config") or {}
        level = get(config, "thinking_level")
        system = body.get("system_instruction") or body.get("systemInstruction") or ""
        prompted = Prompted(
            model=model,
            texts=texts,
            images=images,
            ask=Ask(
                prompt="\n".join(texts),
                system=_system_text(system),
                response_mime_type=mime,
                schema=schema,
                polygon_masks=self._polygon_masks(model),
            ),
            max_output_tokens=_int_or_none(get(config, "max_output_tokens")),
            thinking=_thinks(model, None, level),
        )
        return prompted, items

    async def get_interaction(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
            stored = self._interactions.get(request.match_info["id"])
            if stored is None:
                raise errors.not_found("Interaction not found (or created with store: false).")
        except ApiError as exc:
            return _interactions_error(exc)
        return web.json_response(stored)

    async def delete_interaction(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
            if self._interactions.pop(request.match_info["id"], None) is None:
                raise errors.not_found("Interaction not found.")
        except ApiError as exc:
            return _interactions_error(exc)
        return web.json_response({})

    # Files API

    async def upload(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        upload_id = request.query.get("upload_id")
        try:
            if upload_id is None:
                return await self._start_upload(request, version)
            session = self.files.upload(upload_id)
            if session is None:
                raise errors.not_found("The upload session was not found or has ended.")
            return await self._upload_chunk(request, session)
        except ApiError as exc:
            status = "active" if upload_id and self.files.upload(upload_id) else "final"
            exc.headers.setdefault("X-Goog-Upload-Status", status)
            return _google_error(exc)

    async def _start_upload(self, request: web.Request, version: str) -> web.Response:
        self._check_key(request)
        headers = request.headers
        protocol = headers.get("X-Goog-Upload-Protocol", "").lower()
        command = headers.get("X-Goog-Upload-Command", "").lower()
        if protocol != "resumable" or command != "start":
            raise errors.invalid_argument(
                "The local server takes resumable uploads only: send X-Goog-Upload-Protocol: "
                "resumable and X-Goog-Upload-Command: start."
            )
        body = await self._json_body(request, required=False)
        file = get(body, "file", {})
        try:
            size = int(headers.get("X-Goog-Upload-Header-Content-Length", ""))
        except ValueError:
            size = _int_or_none(get(file, "size_bytes")) or -1
        if size < 0:
            raise errors.invalid_argument(
                "X-Goog-Upload-Header-Content-Length must give the file's size in bytes."
            )
        if size > MAX_FILE_BYTES:
            raise errors.invalid_argument(f"The file is larger than {MAX_FILE_BYTES} bytes.")
        mime = headers.get("X-Goog-Upload-Header-Content-Type") or get(file, "mime_type")
        name = get(file, "name")
        file_id = None
        if name:
            match = _FILE_NAME.fullmatch(name) or _FILE_NAME.fullmatch(f"files/{name}")
            if not match:
                raise errors.invalid_argument(
                    "A file name must be 'files/' then up to 40 lowercase letters, digits or "
                    "dashes.",
                    "file.name",
                )
            file_id = match.group(1)
            if self.files.get(file_id) is not None:
                raise ApiError(409, "ALREADY_EXISTS", f"File files/{file_id} already exists.")
        base = f"{request.scheme}://{request.host}"
        session = self.files.start_upload(
            size,
            str(mime or "application/octet-stream"),
            get(file, "display_name"),
            file_id,
            f"{base}/{version}",
        )
        upload_url = (
            f"{base}/upload/{version}/files?upload_id={session.id}&upload_protocol=resumable"
        )
        return web.Response(
            headers={
                "X-Goog-Upload-URL": upload_url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Control-URL": upload_url,
            }
        )

    async def _upload_chunk(self, request: web.Request, session: UploadSession) -> web.Response:
        commands = {
            c.strip().lower() for c in request.headers.get("X-Goog-Upload-Command", "").split(",")
        }
        received = len(session.received)
        if "cancel" in commands:
            self.files.cancel_upload(session)
            return web.Response(headers={"X-Goog-Upload-Status": "cancelled"})
        if "query" in commands:
            return web.Response(
                headers={
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Size-Received": str(received),
                }
            )
        if not commands & {"upload", "finalize"}:
            raise errors.invalid_argument(
                "X-Goog-Upload-Command must be upload, 'upload, finalize', query or cancel."
            )
        if "upload" in commands:
            try:
                offset = int(request.headers.get("X-Goog-Upload-Offset", ""))
            except ValueError:
                raise errors.invalid_argument("X-Goog-Upload-Offset is required.") from None
            if offset != received:
                raise ApiError(
                    400,
                    "INVALID_ARGUMENT",
                    f"X-Goog-Upload-Offset {offset} does not match the {received} bytes received.",
                    headers={"X-Goog-Upload-Size-Received": str(received)},
                )
            async for chunk in request.content.iter_chunked(1 << 20):
                self.files.add_chunk(session, chunk)
                if len(session.received) > session.size:
                    self.files.cancel_upload(session)
                    raise errors.invalid_argument(
                        f"More bytes than the {session.size} declared at the start of the upload."
                    )
        if "finalize" not in commands:
            return web.Response(
                headers={
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Size-Received": str(len(session.received)),
                }
            )
        if len(session.received) != session.size:
            self.files.cancel_upload(session)
            raise errors.invalid_argument(
                f"The upload ended after {len(session.received)} bytes; {session.size} were "
                "declared."
            )
        stored = self.files.finish_upload(session)
        return web.json_response(
            {"file": self.files.resource(stored)}, headers={"X-Goog-Upload-Status": "final"}
        )

    async def get_file(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
            file_id = request.match_info["id"]
            stored = self.files.get(file_id)
            if stored is None:
                raise errors.file_not_found(file_id)
        except ApiError as exc:
            return _google_error(exc)
        return web.json_response(self.files.resource(stored))

    async def list_files(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
            size = _int_or_none(request.query.get("pageSize") or request.query.get("page_size"))
            token = request.query.get("pageToken") or request.query.get("page_token")
            try:
                files, next_token = self.files.page(size or 0, token)
            except ValueError as exc:
                raise errors.invalid_argument(str(exc), "page_token") from None
        except ApiError as exc:
            return _google_error(exc)
        body: dict[str, Any] = {}
        if files:
            body["files"] = [self.files.resource(f) for f in files]
        if next_token:
            body["nextPageToken"] = next_token
        return web.json_response(body)

    async def delete_file(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
            file_id = request.match_info["id"]
            if not self.files.delete(file_id):
                raise errors.file_not_found(file_id)
        except ApiError as exc:
            return _google_error(exc)
        return web.json_response({})


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: any free port), ready to listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class LocalServer:
    """The local Gemini-compatible server, started in the running event loop.

    `async with LocalServer(ServerOptions(...)) as server:` then point a client at
    `server.base_url`. `clock` (seconds since the epoch) drives quota windows and the files'
    lifecycle, so tests can move time instead of sleeping.
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self._sock = sock  # a listening socket shared by several worker processes
        self._service = Service(self.options, clock or time.time)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = web.AppRunner(
            self._service.app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        await runner.setup()
        try:
            sock = self._sock or bind_socket(self.options.host, self.options.port)
            site = web.SockSite(runner, sock, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = sock.getsockname()[1]
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        self.base_url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is None:
            return
        self._service.closing.set()  # hung requests give up now
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """The counters GET /local/stats returns."""
        return self._service.snapshot()

    def __repr__(self) -> str:
        return f"LocalServer({self.base_url or 'not started'})"


# helpers


def _stat_key(request: web.Request) -> str:
    """ "METHOD path" with the version and model filled in and file or interaction ids not."""
    resource = request.match_info.route.resource
    if resource is None:
        return f"{request.method} (unknown path)"
    path = resource.canonical.replace("{id}", "{name}" if "/files/" in request.path else "{id}")
    for name in ("version", "model_action"):
        if name in request.match_info:
            path = path.replace(f"{{{name}}}", request.match_info[name])
    return f"{request.method} {path}"


def _google_error(exc: ApiError) -> web.Response:
    return web.json_response(exc.google_body(), status=exc.http_status, headers=exc.headers)


def _interactions_error(exc: ApiError) -> web.Response:
    return web.json_response(
        exc.interactions_body(), status=exc.interactions_http_status, headers=exc.headers
    )


def _b64decode(data: str) -> bytes | None:
    """Standard or URL-safe base64, padded or not (the SDK sends URL-safe); None if invalid."""
    if "-" in data or "_" in data:
        data = data.translate(_URLSAFE)
    if len(data) % 4:
        data += "=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _resolution(value: Any, where: str) -> str | None:
    """ "MEDIA_RESOLUTION_HIGH", "high" or {"level": ...} -> "high"; None when unspecified."""
    if isinstance(value, dict):
        value = value.get("level")
    if value is None:
        return None
    match = _RESOLUTION.match(str(value).lower())
    if not match:
        raise errors.invalid_argument(f"Invalid value at '{where}': {value!r}.", where)
    level = match.group(1)
    return None if level == "unspecified" else level


def _thinks(model: str, budget: Any, level: Any) -> bool:
    """Whether the model thinks: 2.5 and 3 do by default; budget 0 or level minimal turn it off."""
    if budget is not None:
        return _int_or_none(budget) != 0
    if level is not None:
        return str(level).lower() != "minimal"
    return lookup(model).thinking.control != "none"


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise errors.invalid_argument(f"Expected an integer, got {value!r}.") from None


def _system_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        parts = get(value, "parts", [])
        return "\n".join(p["text"] for p in parts if isinstance(p, dict) and "text" in p)
    return ""


def _modalities(prompted: Prompted) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [{"modality": "TEXT", "tokenCount": prompted.text_token_count}]
    if prompted.images:
        details.append({"modality": "IMAGE", "tokenCount": sum(prompted.image_token_counts)})
    return details


def _interaction_items(value: Any) -> list[dict[str, Any]]:
    """Content items from any accepted input shape: a string, one item, a flat list of items
    (seed 003), steps [{"type": "user_input", "content": [...]}] (the SDK), or turns
    [{"role": "user", "content": ...}]."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise errors.invalid_argument("'input' is required.")
    items: list[dict[str, Any]] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise errors.invalid_argument("Each input entry must be an object.")
        if entry.get("type") == "user_input" or "role" in entry:
            content = entry.get("content")
            items.extend(_interaction_items(content) if content else [])
        elif entry.get("type") in ("model_output", "thought"):
            continue  # earlier turns' answers are context only
        else:
            items.append(entry)
    return items


def _response_format(body: dict[str, Any]) -> tuple[str | None, Any]:
    """(response MIME type, schema) from response_format (object or list) or the legacy fields."""
    mime = get(body, "response_mime_type")
    schema = None
    formats: Iterable[Any] = get(body, "response_format") or []
    if isinstance(formats, dict):
        formats = [formats]
    for entry in formats:
        if not isinstance(entry, dict):
            continue
        kind = entry.get("type")
        if kind == "text":
            mime = get(entry, "mime_type") or mime
            schema = entry.get("schema", schema)
            break
        if kind in ("audio", "image", "video"):
            continue
        schema = entry  # legacy: the JSON schema itself
        break
    return mime, schema
