"""Typed request and response values of the Gemini REST protocol.

One request type serves both wire flavours (generateContent and Interactions) so a caller
switches API by a setting, not by rewriting its requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

# Here, with the other plain values, rather than in client.py: a config names it without
# importing the HTTP client (aiohttp, ~0.2 s) — `pipeline --help` builds every command's flags.
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"

Flavor = Literal["generateContent", "interactions"]
MediaResolution = Literal["low", "medium", "high", "ultra_high"]
# Image files one request may carry (docs/gemini-api.md § Sending images: 3,600; the guide,
# https://ai.google.dev/gemini-api/docs/image-understanding, "Limitations", gives it for Gemini
# 2.5, 2.0 and 1.5 in its generateContent editions, for Gemini models at large in the newest).
MAX_IMAGES_PER_REQUEST = 3600


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image: inline bytes (`data`) or an uploaded file (`file_uri`), never both.

    `caption` is a text part sent right before the image (what it is: "Reference image 1: a
    cracked weld.", "Image 0:"), so a request with several images can say which is which.
    """

    mime_type: str
    data: bytes | None = None
    file_uri: str | None = None
    resolution: MediaResolution | None = None  # per-image media resolution (Gemini 3)
    caption: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.file_uri is None):
            raise ValueError("ImagePart needs exactly one of data or file_uri")

    def __repr__(self) -> str:  # never dump megabytes of image into a log line
        where = f"{len(self.data)} bytes" if self.data is not None else self.file_uri
        return f"ImagePart({self.mime_type}, {where})"


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A prompt with images and the generation settings the pipeline uses.

    `images` go before `prompt` (the guide's Interactions edition puts the text first; both
    orders work, docs/gemini-api.md § Sending images; the client follows each API's own edition),
    each right after its caption text, in the order given. None means "leave it to the
    service's default".
    """

    model: str
    prompt: str
    images: tuple[ImagePart, ...] = ()
    system_instruction: str | None = None
    response_mime_type: str | None = None
    response_schema: dict[str, Any] | None = None  # OpenAPI subset (responseSchema)
    response_json_schema: dict[str, Any] | None = None  # JSON Schema (responseJsonSchema)
    temperature: float | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = None  # Gemini 2.5
    thinking_level: str | None = None  # Gemini 3: minimal | low | medium | high
    media_resolution: MediaResolution | None = None  # Gemini 3, request-wide
    # "cachedContents/…": a cached content holding what the request would otherwise repeat
    # (its system instruction and leading images: caches.py); generateContent only
    cached_content: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Billed token counts; zero where the service did not report a figure."""

    prompt_tokens: int = 0
    # the part of `prompt_tokens` served from a cache (implicit, or a cached content the request
    # named), billed at the cached rate
    # (generateContent's usageMetadata.cachedContentTokenCount, Interactions' total_cached_tokens)
    cached_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    total_tokens: int = 0
    prompt_by_modality: dict[str, int] = field(default_factory=dict)  # e.g. {"IMAGE": 258}
    # Vertex AI's usageMetadata.trafficType, the quota that served it: "ON_DEMAND",
    # "PROVISIONED_THROUGHPUT", ...; "" where none is said (the Developer API)
    traffic_type: str = ""


def total_usage(usages: Iterable[Usage]) -> Usage:
    """The usage of a continued answer: every hop re-sends (and is billed for) its input, so
    each count is the sum over hops, modality by modality (the SDK's `_merge_usages`)."""
    hops = list(usages)
    by_modality: dict[str, int] = {}
    for usage in hops:
        for modality, count in usage.prompt_by_modality.items():
            by_modality[modality] = by_modality.get(modality, 0) + count
    return Usage(
        prompt_tokens=sum(usage.prompt_tokens for usage in hops),
        cached_tokens=sum(usage.cached_tokens for usage in hops),
        output_tokens=sum(usage.output_tokens for usage in hops),
        thoughts_tokens=sum(usage.thoughts_tokens for usage in hops),
        total_tokens=sum(usage.total_tokens for usage in hops),
        prompt_by_modality=by_modality,
        traffic_type=_traffic_types(hops),
    )


def _traffic_types(hops: list[Usage]) -> str:
    """The hops' traffic types, each once in order ("PROVISIONED_THROUGHPUT,ON_DEMAND" for an
    answer whose later hop spilled over to pay-as-you-go)."""
    named = dict.fromkeys(usage.traffic_type for usage in hops if usage.traffic_type)
    return ",".join(named)


@dataclass(frozen=True, slots=True)
class GenerateResponse:
    """What the pipeline needs from an answer, plus the raw JSON body for keeping.

    `finish_reason` carries the service's value unchanged, known or not (LANGUAGE, NO_IMAGE,
    IMAGE_OTHER, MALFORMED_RESPONSE, ...). Of the SDK's FinishReason enum (types.py), these mean
    the answer was withheld (blocked): SAFETY, RECITATION, LANGUAGE, BLOCKLIST,
    PROHIBITED_CONTENT, SPII, IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT, IMAGE_RECITATION,
    MODEL_ARMOR (Vertex only), ESCALATION; and Interactions' CONTENT_BLOCKED (see
    interactions.py). Cut short: MAX_TOKENS, and CONTINUATION when the service stopped at its
    per-request decode limit and the answer was not continued to the end. Neither a block nor a
    cut: STOP, OTHER, NO_IMAGE, IMAGE_OTHER, MALFORMED_RESPONSE, MALFORMED_FUNCTION_CALL,
    UNEXPECTED_TOOL_CALL, TOO_MANY_TOOL_CALLS, MISSING_THOUGHT_SIGNATURE, PUP_LIMITED_DISABLED.
    """

    text: str  # answer text, thought parts skipped; "" when there is none
    finish_reason: str | None  # STOP, MAX_TOKENS, SAFETY, ... (Interactions: mapped to these)
    block_reason: str | None  # promptFeedback.blockReason when the prompt itself was blocked
    usage: Usage  # summed over the hops of a continued answer
    # The body as received (JSON text), the key redacted after it was parsed; for an answer
    # continued over several requests, the JSON array of their bodies.
    raw: str
    # What the service said about how the answer ended: an Interactions step's or the
    # interaction's error, generateContent's finishMessage; None when it said nothing.
    finish_message: str | None = None


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A Files API resource."""

    name: str  # "files/abc123"
    uri: str
    mime_type: str
    size_bytes: int
    state: str  # PROCESSING | ACTIVE | FAILED
    expiration_time: str | None  # RFC 3339
    sha256_hash: str | None
    display_name: str | None = None
