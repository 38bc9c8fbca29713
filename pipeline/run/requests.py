"""A unit's request, planned and then made, the same way however its answer is bought.

    Unit ─plan─► Plan: token estimate (costing.py), limits, each image inline or uploaded
         ─make─► GenerateRequest: reference images first, then the unit's images, captioned

On Vertex AI (`[api] backend = "vertex"`), a gs:// input sent as it is stored goes in place: its
part is `fileData {fileUri: "gs://...", mimeType}` and Vertex reads the object itself, so the
request carries none of its bytes and no inline limit binds it (mode "in_place"; the item says
so, `ImageItem.in_place`, decided where it is prepared: pipeline/inputs/in_place.py); one that
`max_side`, a conversion or EXIF rotation changed is sent inline after preparing, as anywhere.
There is no Files API there, so an image that fits neither way is refused.

The plan is decided before anything is sent: a request over a limit (images, input tokens,
`[limits] tpm` where calls are paced by it, the inline limit) is refused with the limit it would
break, and `Plan.failed` turns that — or any failure before an answer — into the Outcome its row
is made from, so every buyer (an interactive call, a Batch Mode job) refuses alike. The request
is made with the uploads and reference parts the buyer gives: an interactive call uses the run's
(reused while they live, deleted at the end), a Batch Mode job its own (made for the job and
deleted with it, since an upload must outlive the job that reads it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipeline.config import BATCH_INLINE_LIMIT_MB, Config, ConfigError
from pipeline.gemini.types import GenerateRequest, GenerateResponse, ImagePart
from pipeline.inputs import images
from pipeline.inputs.references import ReferenceParts, inline_size
from pipeline.records import ImageItem, Parsed, Unit
from pipeline.run.costing import Costing
from pipeline.run.offload import offload
from pipeline.run.rows import Outcome
from pipeline.run.uploads import Uploads
from pipeline.tasks import multi

REQUEST_OVERHEAD = 2048  # JSON around the parts, counted against the inline limit
# Reading a small image on the event loop costs less than a thread hop; big ones go to threads.
SMALL_BYTES = 64 << 10
IN_PLACE = "in_place"  # a gs:// object Vertex AI reads itself (fileData.fileUri)


@dataclass(frozen=True, slots=True)
class Plan:
    """How a unit's request is made, decided before anything is sent (`RequestMaker.plan`)."""

    modes: tuple[str, ...]  # "inline", "upload" or "in_place", for each image of the unit
    est_image_tokens: int  # every image of the request, reference images included
    est_tokens: int  # the whole input: images, prompt, system instruction, captions
    error: str | None = None  # why the request cannot be made (a limit it would break)
    body_bytes: int = 0  # about what its body weighs: the overhead and the inline images

    @property
    def input_mode(self) -> str:
        """The row's input_mode: inline, upload, in_place, mixed (a group sent partly each
        way), or none."""
        kinds = set(self.modes)
        return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none"

    def outcome(
        self,
        parsed: Parsed,
        response: GenerateResponse | None = None,
        attempts: int = 0,
        latency_ms: float = 0.0,
        retryable: bool = False,
    ) -> Outcome:
        """What became of this request, with the plan's input mode and estimates."""
        mode, est_image, est = self.input_mode, self.est_image_tokens, self.est_tokens
        return Outcome(parsed, response, attempts, latency_ms, mode, est_image, est, retryable)

    def failed(
        self, reason: str, attempts: int = 0, latency_ms: float = 0.0, retryable: bool = False
    ) -> Outcome:
        """An error row's outcome: refused before sending (attempts 0), or failed trying."""
        return self.outcome(Parsed("error", error=reason), None, attempts, latency_ms, retryable)


class RequestMaker:
    """Plans and makes the run's requests (see the module docstring); one for the run."""

    def __init__(self, config: Config, request: GenerateRequest, references: ReferenceParts):
        self.config = config
        self.request = request  # the task's request, without images
        self.costing = Costing(config, request, references.loaded)
        self.captioned = self.costing.captioned
        self.overhead = request_overhead(request) + references.inline_bytes
        if references.inline_bytes and self.overhead > config.inline_limit_bytes:
            # every request would be refused: a config to change, not a pile of error rows
            raise ConfigError(
                f"{config.source}: [task] reference_images: the prompt and the inline reference "
                f"images take {self.overhead:,} bytes, over [api] inline_limit_mb "
                f'({config.api.inline_limit_mb:g} MB): use [images] mode = "auto" or "upload"'
            )

    def plan(self, unit: Unit, *, paced: bool = True) -> Plan:
        """What the unit's request costs and how its images go; `Plan.error` says which limit
        a request over one would break. `paced`: an interactive call, which `[limits] tpm`
        binds; unpaced, a Batch Mode job's line, under the job's own token cap and Batch Mode's
        inline limit."""
        sizes = [(item.sent_width, item.sent_height) for item in unit.items]
        estimate = self.costing.request(sizes)
        est_image, est = estimate.image_tokens, estimate.input_tokens
        tpm = self.config.limits.tpm if paced else None
        why = self.costing.over_limits(len(sizes), est, tpm)
        if why is not None:
            return Plan((), est_image, est, why)
        limit = self._inline_limit(paced)
        modes, room, why = self._modes(unit, limit)
        return Plan(modes, est_image, est, why, limit[0] - room)

    def _inline_limit(self, paced: bool) -> tuple[int, str]:
        """(bytes, the refusal of an image that must go inline and does not fit): the run's
        limit for an interactive call; for a Batch Mode job's line, Batch Mode's 20 MB at most
        (above it a request goes through the Files API, whatever `[api] inline_limit_mb`
        allows)."""
        batch = self.config.batch_inline_limit_bytes
        if paced or batch == self.config.inline_limit_bytes:
            return self.config.inline_limit_bytes, inline_refusal(self.config)
        return batch, inline_refusal(self.config, batch=True)

    def _modes(self, unit: Unit, limit: tuple[int, str]) -> tuple[tuple[str, ...], int, str | None]:
        """auto: each image inline while the request still fits the inline limit, in order,
        else uploaded; inline: all inline, if they fit; upload: all uploaded. With the room
        left under the inline limit, and why the request cannot be made."""
        mode = self.config.images.mode
        room = limit[0] - self.overhead
        if mode == "upload":
            return ("upload",) * len(unit.items), room, None
        modes = []
        vertex = self.config.api.backend == "vertex"
        for item in unit.items:
            size = inline_size(item)
            if mode == "auto" and vertex and item.in_place:  # decided where it was prepared
                modes.append(IN_PLACE)
            elif size <= room:
                modes.append("inline")
                room -= size
            elif mode == "auto" and not vertex:  # Vertex has no Files API to upload to
                modes.append("upload")
            else:
                return ("inline",) * len(unit.items), room, limit[1]
        return tuple(modes), room, None

    async def make(
        self,
        unit: Unit,
        plan: Plan,
        uploads: Uploads,
        references: ReferenceParts,
        cached: str | None = None,
    ) -> GenerateRequest:
        """The request about `unit`, its images inline (read now) or uploaded through
        `uploads` as planned, after the reference images `references` gives — or naming the
        cached content `cached` that holds them and the system instruction instead
        (run/context_cache.py)."""
        targets = [
            await _image_part(item, mode, uploads)
            for item, mode in zip(unit.items, plan.modes, strict=True)
        ]
        if cached is not None:
            request = replace(self.request, system_instruction=None, cached_content=cached)
            return request_with_images(request, (), targets, captioned=self.captioned)
        parts = await references.parts()
        return request_with_images(self.request, parts, targets, captioned=self.captioned)


async def _image_part(item: ImageItem, mode: str, uploads: Uploads) -> ImagePart:
    if mode == IN_PLACE:
        return ImagePart(item.mime_type, file_uri=item.source.path)
    if mode == "inline":
        data = await offload(item.send_size > SMALL_BYTES * 16, images.read_bytes, item)
        return ImagePart(item.mime_type, data=data)
    upload = await uploads.get(item)
    return ImagePart(upload.mime_type, file_uri=upload.uri)


def request_with_images(
    request: GenerateRequest,
    references: Sequence[ImagePart],
    targets: Sequence[ImagePart],
    *,
    captioned: bool,
) -> GenerateRequest:
    """The task's request with its images: the reference images (already captioned) first, then
    the unit's, captioned "Image 0:", "Image 1:", ... when `captioned` (pipeline/tasks/multi.py).
    The one place a request gets its images, whichever engine sends it."""
    if captioned:
        targets = [
            replace(part, caption=multi.target_caption(index)) for index, part in enumerate(targets)
        ]
    return replace(request, images=(*references, *targets))


def request_overhead(request: GenerateRequest) -> int:
    """Bytes of a request besides its image (prompt, system instruction, schema, JSON)."""
    prompt_text = (request.system_instruction or "") + request.prompt
    schema = request.response_schema or request.response_json_schema
    return REQUEST_OVERHEAD + len(prompt_text.encode()) + len(json.dumps(schema or {}))


def inline_refusal(config: Config, *, batch: bool = False) -> str:
    """The error of an image that must go inline and does not fit (`batch`: Batch Mode's
    limit bound, below the run's own)."""
    if batch:
        limit = f"{BATCH_INLINE_LIMIT_MB} MB"
        return f"the request would exceed Batch Mode's inline limit of {limit}; use mode auto"
    limit = f"{config.api.inline_limit_mb:g} MB"
    return f"the request would exceed the inline limit of {limit}; use mode auto"
