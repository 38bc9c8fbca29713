"""What a request costs in input tokens, and whether it may be sent at all, decided before it is:
one calculation for the interactive caller (its pacing, its limits, the rows' est_* columns),
Batch Mode (its job records, `[batch] max_job_tokens`) and `pipeline estimate`.

A request carries the run's reference images, then the unit's images (each captioned "Image N:"
when they are not alone: pipeline/tasks/multi.py), then the prompt and the system instruction.
Its input tokens are every image's by the model's rule (pipeline/gemini/tokens.py, the rule the
local server bills by) plus the text's: the prompt, the system instruction and every caption.
Images are counted at the size they are sent (after `[images] max_side`), given as (width,
height) pairs so that `estimate`, which reads headers only, counts exactly what a run sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.gemini.tokens import image_token_range, image_tokens, text_tokens
from pipeline.gemini.types import MAX_IMAGES_PER_REQUEST, GenerateRequest
from pipeline.inputs.references import LoadedReference
from pipeline.tasks import multi

# The input context of the current Gemini models (2.5 and 3 Flash and Pro: 1,048,576 tokens,
# ai.google.dev/gemini-api/docs/models); a request estimated above it is never sent.
INPUT_TOKEN_LIMIT = 1_048_576

Sizes = Sequence[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """The estimated input of one request."""

    image_tokens: int  # every image of the request, reference images included
    input_tokens: int  # the whole input: images, prompt, system instruction, captions


class Costing:
    """The token arithmetic of one config's requests (see the module docstring)."""

    def __init__(
        self, config: Config, request: GenerateRequest, references: tuple[LoadedReference, ...]
    ) -> None:
        self.spec = config.task.spec
        self.resolution = request.media_resolution
        self.captioned = multi.captioned(config.task.grouped, len(references))
        self.reference_sizes = [(ref.item.sent_width, ref.item.sent_height) for ref in references]
        prompt = (request.system_instruction or "") + request.prompt
        captions = sum(text_tokens(ref.caption) for ref in references)
        self.prompt_tokens = text_tokens(prompt) + captions  # the same text in every request
        self.reference_tokens = self.images(self.reference_sizes)
        # what a cached content would hold (run/context_cache.py): the system instruction and
        # the captioned reference images every request starts with
        system = text_tokens(request.system_instruction or "")
        self.cacheable_tokens = system + captions + self.reference_tokens

    def images(self, sizes: Sizes, resolution: str | None = None) -> int:
        """Tokens of images sent at `sizes` (at another media resolution, to price a saving)."""
        level = resolution or self.resolution
        return sum(image_tokens(self.spec, width, height, level) for width, height in sizes)

    def image_bounds(self, sizes: Sizes) -> tuple[int, int]:
        """(fewest, most) tokens a request's images may be billed, its reference images'
        included: `images` where the rule is exact, a range where it is not (2.x at HIGH)."""
        bounds = [
            image_token_range(self.spec, width, height, self.resolution)
            for width, height in [*self.reference_sizes, *sizes]
        ]
        return sum(low for low, _ in bounds), sum(high for _, high in bounds)

    def captions(self, count: int) -> int:
        """Tokens of the "Image N:" captions of a request about `count` images."""
        if not self.captioned:
            return 0
        return sum(text_tokens(multi.target_caption(index)) for index in range(count))

    def request(self, sizes: Sizes) -> TokenEstimate:
        """The estimate of one request about images sent at `sizes`, in order."""
        images = self.reference_tokens + self.images(sizes)
        return TokenEstimate(images, images + self.prompt_tokens + self.captions(len(sizes)))

    def over_limits(self, images: int, input_tokens: int, tpm: int | None) -> str | None:
        """Why a request about this many images, estimated at `input_tokens`, cannot be sent
        (the reference images count too), or None. `tpm`: `[limits] tpm` where the request is
        paced by it (a request over a minute's quota could never go); None in Batch Mode."""
        count = images + len(self.reference_sizes)
        if count > MAX_IMAGES_PER_REQUEST:
            return (
                f"the request would carry {count:,} images (reference images included); "
                f"a request takes at most {MAX_IMAGES_PER_REQUEST:,}"
            )
        for limit, what in ((INPUT_TOKEN_LIMIT, "the model's input limit"), (tpm, "[limits] tpm")):
            if limit and input_tokens > limit:
                return (
                    f"the request is estimated at {input_tokens:,} input tokens, over {what} of "
                    f"{limit:,}: use fewer or smaller images (max_side)"
                )
        return None
