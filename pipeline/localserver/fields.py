"""The request bodies the server accepts, declared once as data (spec.py walks them).

Sources: the Gemini API reference (ai.google.dev/api/generate-content, /api/tokens, /api/files,
/api/caching, /api/interactions-api) and, for exactly which fields the developer API takes, the
official SDK (google-genai 3.6): `models._GenerateContentParameters_to_mldev`,
`_GenerateContentConfig_to_mldev`, `_Part_to_mldev`, `_Tool_to_mldev`, `_ToolConfig_to_mldev`,
`_SafetySetting_to_mldev` (fields the SDK refuses "in Gemini Developer API mode" are left out),
`files._CreateFileParameters_to_mldev`, `caches._CreateCachedContentParameters_to_mldev`, and the
Interactions types `_gaos/types/interactions/*` (CreateModelInteraction and its parts).

Every Message names the SDK types it mirrors (`sdk`); tests/test_localserver_fields.py checks that
each accepted field exists there, so the double is never more lenient than the SDK. The few fields
the SDK lacks but the REST reference documents are listed in `NOT_IN_SDK`.

Names are snake_case (generateContent also takes their camelCase). Parts the double never reads
(tool declarations, speech, function calls) are `ANY_OBJECT`: their inside is not checked.
"""

from __future__ import annotations

from pipeline.localserver.spec import (
    ANY,
    ANY_OBJECT,
    BOOL,
    BYTES,
    DOUBLE,
    FLOAT,
    INT32,
    INT64,
    STRING,
    Choice,
    Enum,
    ListOf,
    MapOf,
    Message,
    Union,
)
from pipeline.models import MEDIA_RESOLUTIONS

# ---------------------------------------------------------------------------- generateContent

SCHEMA_TYPE = Enum(
    "Type",
    ("TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"),
)
# The OpenAPI subset of responseSchema (ai.google.dev/api/caching#Schema). No $ref, $defs or
# additionalProperties: the developer API answers "Unknown name" for those.
SCHEMA = Message("Schema", {}, sdk=("Schema",))
SCHEMA.fields.update(
    {
        "type": SCHEMA_TYPE,
        "format": STRING,
        "title": STRING,
        "description": STRING,
        "nullable": BOOL,
        "enum": ListOf(STRING),
        "max_items": INT64,
        "min_items": INT64,
        "properties": MapOf(SCHEMA),
        "required": ListOf(STRING),
        "min_properties": INT64,
        "max_properties": INT64,
        "min_length": INT64,
        "max_length": INT64,
        "pattern": STRING,
        "example": ANY,
        "any_of": ListOf(SCHEMA),
        "property_ordering": ListOf(STRING),
        "default": ANY,
        "items": SCHEMA,
        "minimum": DOUBLE,
        "maximum": DOUBLE,
    }
)

GLOBAL_MEDIA_RESOLUTION = Enum(
    "GenerationConfig.MediaResolution",
    (
        "MEDIA_RESOLUTION_UNSPECIFIED",
        "MEDIA_RESOLUTION_LOW",
        "MEDIA_RESOLUTION_MEDIUM",
        "MEDIA_RESOLUTION_HIGH",
    ),  # no ULTRA_HIGH: per part only (docs/gemini-api.md § Image tokens; types.MediaResolution)
    rule="media.global-value",
)
PART_MEDIA_RESOLUTION = Message(
    "Part.MediaResolution",
    {
        "level": Enum(
            "Part.MediaResolution.Level",
            (
                "MEDIA_RESOLUTION_UNSPECIFIED",
                "MEDIA_RESOLUTION_LOW",
                "MEDIA_RESOLUTION_MEDIUM",
                "MEDIA_RESOLUTION_HIGH",
                "MEDIA_RESOLUTION_ULTRA_HIGH",
            ),
        ),
        "num_tokens": INT32,
    },
    sdk=("PartMediaResolution",),
)
THINKING_CONFIG = Message(
    "ThinkingConfig",
    {
        "include_thoughts": BOOL,
        "thinking_budget": INT32,
        "thinking_level": Enum(
            "ThinkingConfig.ThinkingLevel",
            ("THINKING_LEVEL_UNSPECIFIED", "MINIMAL", "LOW", "MEDIUM", "HIGH", "XHIGH"),
        ),
    },
    sdk=("ThinkingConfig",),
)
GENERATION_CONFIG = Message(
    "GenerationConfig",
    {
        "temperature": FLOAT,
        "top_p": FLOAT,
        "top_k": INT32,
        "candidate_count": INT32,
        "max_output_tokens": INT32,
        "stop_sequences": ListOf(STRING),
        "response_logprobs": BOOL,
        "logprobs": INT32,
        "presence_penalty": FLOAT,
        "frequency_penalty": FLOAT,
        "seed": INT32,
        "response_mime_type": STRING,
        "response_schema": SCHEMA,
        "response_json_schema": ANY,  # google.protobuf.Value: any JSON Schema
        "response_modalities": ListOf(
            Enum("GenerationConfig.Modality", ("MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO"))
        ),
        "media_resolution": GLOBAL_MEDIA_RESOLUTION,
        "speech_config": ANY_OBJECT,
        "thinking_config": THINKING_CONFIG,
        "image_config": Message(
            "ImageConfig", {"aspect_ratio": STRING, "image_size": STRING}, sdk=("ImageConfig",)
        ),
        "enable_enhanced_civic_answers": BOOL,
        "audio_transcription_config": ANY_OBJECT,
    },
    sdk=("GenerateContentConfig",),
)
BLOB = Message("Blob", {"mime_type": STRING, "data": BYTES}, sdk=("Blob",))
FILE_DATA = Message("FileData", {"mime_type": STRING, "file_uri": STRING}, sdk=("FileData",))
PART = Message(
    "Part",
    {
        "text": STRING,
        "inline_data": BLOB,
        "file_data": FILE_DATA,
        "thought": BOOL,
        "thought_signature": BYTES,
        # on the versions the model's table entry lists: model_checks.check_part_version
        "media_resolution": PART_MEDIA_RESOLUTION,
        "video_metadata": Message(
            "VideoMetadata",
            {"start_offset": STRING, "end_offset": STRING, "fps": DOUBLE},
            sdk=("VideoMetadata",),
        ),
        "function_call": ANY_OBJECT,
        "function_response": ANY_OBJECT,
        "executable_code": ANY_OBJECT,
        "code_execution_result": ANY_OBJECT,
        "part_metadata": ANY_OBJECT,
        "tool_call": ANY_OBJECT,
        "tool_response": ANY_OBJECT,
    },
    sdk=("Part",),
)
CONTENT = Message("Content", {"parts": ListOf(PART), "role": STRING}, sdk=("Content",))
TOOL = Message(
    "Tool",
    {
        "function_declarations": ListOf(ANY_OBJECT),
        "google_search": ANY_OBJECT,
        "google_search_retrieval": ANY_OBJECT,
        "code_execution": ANY_OBJECT,
        "url_context": ANY_OBJECT,
        "computer_use": ANY_OBJECT,
        "file_search": ANY_OBJECT,
        "google_maps": ANY_OBJECT,
        "mcp_servers": ListOf(ANY_OBJECT),
    },
    sdk=("Tool",),
)
TOOL_CONFIG = Message(
    "ToolConfig",
    {
        "function_calling_config": ANY_OBJECT,
        "retrieval_config": ANY_OBJECT,
        "include_server_side_tool_invocations": BOOL,
    },
    sdk=("ToolConfig",),
)
SAFETY_SETTING = Message(
    "SafetySetting", {"category": STRING, "threshold": STRING}, sdk=("SafetySetting",)
)
GENERATE_CONTENT_REQUEST = Message(
    "GenerateContentRequest",
    {
        "model": STRING,
        "contents": ListOf(CONTENT),
        "system_instruction": CONTENT,
        "generation_config": GENERATION_CONFIG,
        "safety_settings": ListOf(SAFETY_SETTING),
        "tools": ListOf(TOOL),
        "tool_config": TOOL_CONFIG,
        "cached_content": STRING,
        "labels": MapOf(STRING),
        "service_tier": STRING,
        "continuation_token": STRING,
        "store": BOOL,
    },
    # _GenerateContentParameters_to_mldev: `config` becomes generationConfig, and its
    # system_instruction, tools, safety_settings, ... are lifted to the request.
    sdk=("_GenerateContentParameters", "GenerateContentConfig"),
    sdk_names={"generation_config": "config"},
)
COUNT_TOKENS_REQUEST = Message(
    "CountTokensRequest",
    {"contents": ListOf(CONTENT), "generate_content_request": GENERATE_CONTENT_REQUEST},
    sdk=("_CountTokensParameters",),
)

# ---------------------------------------------------------------------------- cachedContents

# caches.create (SDK `_CreateCachedContentParameters_to_mldev`: the config's fields lifted to
# the top) and caches.update (`_UpdateCachedContentConfig_to_mldev`: ttl or expire_time only).
# Durations ("300s") and timestamps (RFC 3339) arrive as JSON strings.
CACHED_CONTENT = Message(
    "CachedContent",
    {
        "model": STRING,
        "contents": ListOf(CONTENT),
        "system_instruction": CONTENT,
        "tools": ListOf(TOOL),
        "tool_config": TOOL_CONFIG,
        "ttl": STRING,
        "expire_time": STRING,
        "display_name": STRING,
    },
    sdk=("_CreateCachedContentParameters", "CreateCachedContentConfig"),
)
CACHED_CONTENT_UPDATE = Message(
    "CachedContentUpdate",
    {"ttl": STRING, "expire_time": STRING},
    sdk=("UpdateCachedContentConfig",),
)

# ---------------------------------------------------------------------------- Batch Mode

# batches.create (SDK `_CreateBatchJobParameters_to_mldev`, `_BatchJobSource_to_mldev`,
# `_InlinedRequest_to_mldev`): {"batch": {"displayName", "inputConfig": {"fileName"} |
# {"requests": {"requests": [{"request", "metadata"}]}}, "webhookConfig"}}
INLINED_REQUEST = Message(
    "InlinedRequest",
    {"request": GENERATE_CONTENT_REQUEST, "metadata": ANY_OBJECT},  # metadata: a Struct
    sdk=("InlinedRequest",),
    sdk_names={"request": "contents"},  # the SDK's contents + config become `request`
)
BATCH_INPUT_CONFIG = Message(
    "InputConfig",
    {
        "file_name": STRING,
        "requests": Message(
            "InlinedRequests",
            {"requests": ListOf(INLINED_REQUEST)},
            sdk=("BatchJobSource",),
            sdk_names={"requests": "inlined_requests"},
        ),
    },
    sdk=("BatchJobSource",),
    sdk_names={"requests": "inlined_requests"},
)
GENERATE_CONTENT_BATCH = Message(
    "GenerateContentBatch",
    {"display_name": STRING, "input_config": BATCH_INPUT_CONFIG, "webhook_config": ANY_OBJECT},
    sdk=("CreateBatchJobConfig", "_CreateBatchJobParameters"),
    sdk_names={"input_config": "src"},
)
BATCH_GENERATE_CONTENT_REQUEST = Message(
    "BatchGenerateContentRequest",
    {"batch": GENERATE_CONTENT_BATCH},
    sdk=("_CreateBatchJobParameters",),
    sdk_names={"batch": "config"},
)
# One line of a JSONL input file (the batch-mode guide's format; no SDK type describes it).
BATCH_FILE_LINE = Message("BatchFileLine", {"key": STRING, "request": GENERATE_CONTENT_REQUEST})

# ---------------------------------------------------------------------------- Files API

FILE = Message(
    "File",
    {
        "name": STRING,
        "display_name": STRING,
        "mime_type": STRING,
        "size_bytes": INT64,
    },  # the output-only fields (uri, state, ...) are not taken on create
    sdk=("File",),
)
CREATE_FILE_REQUEST = Message("CreateFileRequest", {"file": FILE}, sdk=("_CreateFileParameters",))

# ---------------------------------------------------------------------------- Interactions

_I = "google.genai._gaos.types.interactions."  # where the Interactions SDK types live
RESOLUTION = Enum("MediaResolution", MEDIA_RESOLUTIONS, case_sensitive=True)
TEXT_CONTENT = Message(
    "TextContent",
    {"type": STRING, "text": STRING, "annotations": ListOf(ANY_OBJECT)},
    sdk=(_I + "textcontent.TextContent",),
)
IMAGE_CONTENT = Message(
    "ImageContent",
    {"type": STRING, "data": BYTES, "uri": STRING, "mime_type": STRING, "resolution": RESOLUTION},
    sdk=(_I + "imagecontent.ImageContent",),
)
_MEDIA = {"type": STRING, "data": BYTES, "uri": STRING, "mime_type": STRING}
CONTENT_ITEM = Union(
    "type",
    {
        "text": TEXT_CONTENT,
        "image": IMAGE_CONTENT,
        "document": Message(
            "DocumentContent",
            {**_MEDIA, "resolution": RESOLUTION, "processing": ANY_OBJECT},
            sdk=(_I + "documentcontent.DocumentContent",),
        ),
        "audio": Message(
            "AudioContent",
            {**_MEDIA, "channels": INT32, "sample_rate": INT32, "processing": ANY_OBJECT},
            sdk=(_I + "audiocontent.AudioContent",),
        ),
        "video": Message(
            "VideoContent",
            {**_MEDIA, "name": STRING, "resolution": RESOLUTION, "processing": ANY_OBJECT},
            sdk=(_I + "videocontent.VideoContent",),
        ),
    },
)
# Earlier turns may come as steps (the SDK wraps a flat list of items into one user_input step).
INPUT_ENTRY = Union(
    "type",
    {
        **CONTENT_ITEM.variants,
        "user_input": Message(
            "UserInputStep",
            {"type": STRING, "content": ListOf(CONTENT_ITEM)},
            sdk=(_I + "userinputstep.UserInputStep",),
        ),
        "model_output": Message(
            "ModelOutputStep",
            {"type": STRING, "content": ListOf(CONTENT_ITEM), "error": ANY_OBJECT},
            sdk=(_I + "modeloutputstep.ModelOutputStep",),
        ),
        "thought": Message(
            "ThoughtStep",
            {"type": STRING, "signature": STRING, "summary": ListOf(ANY_OBJECT)},
            sdk=(_I + "thoughtstep.ThoughtStep",),
        ),
    },
)
RESPONSE_FORMAT = Union(
    "type",
    {
        "text": Message(
            "TextResponseFormat",
            {"type": STRING, "mime_type": STRING, "schema": ANY_OBJECT},  # JSON Schema
            sdk=(_I + "textresponseformat.TextResponseFormat",),
        ),
        "image": ANY_OBJECT,
        "audio": ANY_OBJECT,
        "video": ANY_OBJECT,
    },
)
INTERACTION_GENERATION_CONFIG = Message(
    "GenerationConfig",
    {
        "temperature": FLOAT,
        "top_p": FLOAT,
        "seed": INT32,
        "stop_sequences": ListOf(STRING),
        "max_output_tokens": INT32,
        "thinking_level": Enum(
            "ThinkingLevel", ("minimal", "low", "medium", "high", "xhigh"), case_sensitive=True
        ),
        "thinking_summaries": STRING,
        "tool_choice": ANY,
        "image_config": ANY_OBJECT,
        "speech_config": ANY,
        "transcription_config": ANY_OBJECT,
        "video_config": ANY_OBJECT,
    },  # no thinking_budget: Interactions takes levels only (docs/gemini-api.md § Interactions API)
    sdk=(_I + "generationconfig.GenerationConfig",),
)
CREATE_INTERACTION = Message(
    "CreateModelInteraction",
    {
        "model": STRING,
        "input": Choice({"string": STRING, "object": CONTENT_ITEM, "array": ListOf(INPUT_ENTRY)}),
        "system_instruction": STRING,
        "generation_config": INTERACTION_GENERATION_CONFIG,
        "response_format": Choice({"object": RESPONSE_FORMAT, "array": ListOf(RESPONSE_FORMAT)}),
        "response_mime_type": STRING,
        "response_modalities": ListOf(STRING),
        "store": BOOL,
        "stream": BOOL,
        "background": BOOL,
        "previous_interaction_id": STRING,
        "continuation_token": STRING,
        "tools": ListOf(ANY_OBJECT),
        "safety_settings": ListOf(
            Message(
                "SafetySetting",
                {"type": STRING, "threshold": STRING, "method": STRING},
                sdk=(_I + "safetysetting.SafetySetting",),
            )
        ),
        "labels": MapOf(STRING),
        "service_tier": STRING,
        "cached_content": STRING,
        "environment": ANY,
        "webhook_config": ANY_OBJECT,
    },
    sdk=(_I + "createmodelinteraction.CreateModelInteraction",),
)

# Documented REST fields the SDK does not send (checked by the same test, listed here once).
NOT_IN_SDK = {
    # ai.google.dev/api/tokens#method:-models.counttokens: a whole request to count
    ("CountTokensRequest", "generate_content_request"),
}
