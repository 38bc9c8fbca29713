"""Typed request and response values of the Gemini REST protocol.

One request type serves both wire flavours (generateContent and Interactions) so a caller
switches API by a setting, not by rewriting its requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Flavor = Literal["generateContent", "interactions"]
MediaResolution = Literal["low", "medium", "high", "ultra_high"]


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image: inline bytes (`data`) or an uploaded file (`file_uri`), never both."""

    mime_type: str
    data: bytes | None = None
    file_uri: str | None = None
    resolution: MediaResolution | None = None  # per-image media resolution (Gemini 3)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.file_uri is None):
            raise ValueError("ImagePart needs exactly one of data or file_uri")

    def __repr__(self) -> str:  # never dump megabytes of image into a log line
        where = f"{len(self.data)} bytes" if self.data is not None else self.file_uri
        return f"ImagePart({self.mime_type}, {where})"


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A prompt with images and the generation settings the pipeline uses.

    `images` go before `prompt` (seed 003 puts the text first for Interactions; both orders work,
    the client follows each API's own guide). None means "leave it to the service's default".
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


@dataclass(frozen=True, slots=True)
class Usage:
    """Billed token counts; zero where the service did not report a figure."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    total_tokens: int = 0
    prompt_by_modality: dict[str, int] = field(default_factory=dict)  # e.g. {"IMAGE": 258}


@dataclass(frozen=True, slots=True)
class GenerateResponse:
    """What the pipeline needs from an answer, plus the raw JSON body for keeping."""

    text: str  # answer text, thought parts skipped; "" when there is none
    finish_reason: str | None  # STOP, MAX_TOKENS, SAFETY, ... (Interactions: mapped to these)
    block_reason: str | None  # promptFeedback.blockReason when the prompt itself was blocked
    usage: Usage
    raw: str  # the response body exactly as received (JSON text)


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
