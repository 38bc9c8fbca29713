"""Protocol-only async client for the Gemini REST API (generateContent, Interactions, Files,
Batch Mode, models.get / models.list).

The names below are imported on first use (PEP 562): importing a light submodule (types,
tokens, schema: what a config's declarations need) runs this file first, and importing the
client here would bring aiohttp into every `pipeline --help`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each exported name and the submodule it lives in.
_HOMES = {
    "DEFAULT_BASE_URL": "types",
    "ApiKeyError": "client",
    "GeminiClient": "client",
    "api_key_from_env": "client",
    "parse_generate_content": "client",
    "parse_response": "client",
    "GeminiError": "errors",
    "parse_interaction": "interactions",
    "ModelInfo": "model_info",
}

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


def __getattr__(name: str) -> Any:
    """A name of __all__, from its submodule (kept here once imported); AttributeError for any
    other, so that `from pipeline.gemini import content` still imports that submodule."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
