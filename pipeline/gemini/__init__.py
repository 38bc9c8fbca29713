"""Protocol-only async client for the Gemini REST API (generateContent, Interactions, Files,
Batch Mode, models.get / models.list)."""

from pipeline.gemini.client import (
    DEFAULT_BASE_URL,
    ApiKeyError,
    GeminiClient,
    api_key_from_env,
    parse_generate_content,
    parse_response,
)
from pipeline.gemini.errors import GeminiError
from pipeline.gemini.interactions import parse_interaction
from pipeline.gemini.model_info import ModelInfo

__all__ = [
    "DEFAULT_BASE_URL",
    "ApiKeyError",
    "GeminiClient",
    "GeminiError",
    "ModelInfo",
    "api_key_from_env",
    "parse_generate_content",
    "parse_interaction",
    "parse_response",
]
