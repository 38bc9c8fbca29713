"""The accepted request bodies (pipeline/localserver/fields.py) against the official SDK's own
types: every field the double accepts must exist there, so the double is never more lenient than
the SDK. (That the SDK's own requests are accepted is test_sdk_compat.py.)"""

from __future__ import annotations

import importlib
import typing

import pytest
from google.genai import types
from google.genai._gaos.types.interactions.imagecontent import ImageContentMimeType

from pipeline.gemini.schema import OPENAPI_FIELDS, OPENAPI_TYPES
from pipeline.localserver import fields
from pipeline.localserver.image_input import INTERACTIONS_IMAGE_TYPES
from pipeline.localserver.spec import Message, messages

ROOTS = (
    fields.GENERATE_CONTENT_REQUEST,
    fields.COUNT_TOKENS_REQUEST,
    fields.CREATE_FILE_REQUEST,
    fields.CREATE_INTERACTION,
    fields.CACHED_CONTENT,
    fields.CACHED_CONTENT_UPDATE,
)
ALL = {id(m): m for root in ROOTS for m in messages(root)}.values()


def sdk_fields(name: str) -> set[str]:
    """The snake_case wire names of an SDK type: google.genai.types.<name> (whose aliases are
    camelCase), or an Interactions type by dotted path (whose aliases are the wire names, e.g.
    `schema` for the attribute `schema_`)."""
    if "." not in name:
        return set(getattr(types, name).model_fields)
    module, _, attribute = name.rpartition(".")
    cls = getattr(importlib.import_module(module), attribute)
    return {info.alias or field for field, info in cls.model_fields.items()}


@pytest.mark.parametrize("message", ALL, ids=lambda m: m.name)
def test_every_accepted_field_exists_in_the_sdk(message: Message):
    assert message.sdk, f"{message.name} names no SDK type"
    known: set[str] = set()
    for name in message.sdk:
        known |= sdk_fields(name)
    for field in message.fields:
        if (message.name, field) in fields.NOT_IN_SDK:
            assert message.sdk_names.get(field, field) not in known  # the list stays honest
            continue
        assert message.sdk_names.get(field, field) in known, f"{message.name}.{field}"


def test_the_trees_cover_what_the_pipeline_and_the_sdk_send():
    assert {m.name for m in ALL} >= {
        "GenerateContentRequest",
        "GenerationConfig",
        "ThinkingConfig",
        "Content",
        "Part",
        "Blob",
        "FileData",
        "Schema",
        "CreateModelInteraction",
        "ImageContent",
        "TextResponseFormat",
    }
    assert "thinking_budget" not in fields.INTERACTION_GENERATION_CONFIG.fields
    assert "ultra_high" not in str(fields.GLOBAL_MEDIA_RESOLUTION.values).lower()


def test_the_type_names_and_image_types_are_the_sdks():
    """responseSchema's type names are types.Type's; the Interactions image types are the SDK's
    ImageContentMimeType literal (google-genai 3.6); the client's config check of a user's
    OpenAPI schema knows the same fields and types as the server."""
    assert fields.SCHEMA_TYPE.values == tuple(kind.value for kind in types.Type)
    literal = typing.get_args(ImageContentMimeType)[0]  # Union[Literal[...], UnrecognizedStr]
    assert set(typing.get_args(literal)) == INTERACTIONS_IMAGE_TYPES
    assert set(OPENAPI_FIELDS) == set(fields.SCHEMA.fields)
    assert fields.SCHEMA_TYPE.values == OPENAPI_TYPES
