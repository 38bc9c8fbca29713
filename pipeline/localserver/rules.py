"""Every rule the local server enforces or behaviour it produces, with its source: one registry.

The server is a strict double of the real service: it refuses what the service refuses, with the
service's answer, and takes what the service takes. Each refusal it makes names a rule id from
`RULES` (errors carry it as `ApiError.rule`, and `/local/stats` counts refusals by rule), so a
newcomer can go from a refused request to the reason and its source in one look. `pipeline
serve-local --rules` prints the table.

`wording` says where the message text comes from: "service" when it is the service's own text
(a documented answer or one seen in public reports, named in `source`), "written" when no source
gives it and the text is ours, written to say the same thing plainly.

What the service does changes (per-part resolution moved from v1alpha to v1beta, the inline
limit went from 20 to 100 MB), so every rule says when its source said so: `dated` names the
source that dates it — a documentation page with its "last updated" date, an SDK file with the
SDK's version, a public thread with its date — or, with `assumed`, the rule is the double's
guess, no dated source found: the first to revisit when the service is seen to differ.

Sources: "docs/gemini-api.md § X" is a section of the project's digest of the Gemini API
documentation (its Sources section names the public pages); "SDK" names a function of google-genai
3.6 (https://github.com/googleapis/python-genai, under `google/genai/`); URLs are public
documentation or issue threads (github.com/owner/repo#N below).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.localserver import simulation

DIGEST = "docs/gemini-api.md §"  # a section of it follows
API_ERRORS = "https://ai.google.dev/gemini-api/docs/api-errors"
ESF_UNKNOWN = (
    "https://github.com/google-gemini/gemini-cli/issues/13972 (Unknown name ... Cannot find "
    "field), https://github.com/zed-industries/zed/issues/44875 (Proto field is not repeating)"
)
ESF_VALUE = "https://github.com/simonw/llm-gemini/issues/49 (Invalid value at ... (TYPE_...))"
DEPRECATIONS = (
    "https://ai.google.dev/gemini-api/docs/deprecations (read 2026-10: each model's shut-down "
    "date, after which requests to it fail)"
)
MODELS_REFERENCE = "https://ai.google.dev/api/models (read 2026-10)"
BATCH_QUOTA = (
    "https://github.com/langchain4j/langchain4j/pull/3942 (the 429 text and Help link of a "
    "batch call), https://github.com/googleapis/python-genai/issues/1901 (enqueued tokens)"
)
# Dated sources (docs/gemini-api.md and /work/shared/gemini-notes.md give the pages' dates).
SDK = "google-genai 3.6"
MEDIA_PAGE = "ai.google.dev/gemini-api/docs/media-resolution (updated 2026-09-19)"
THINKING_PAGE = "ai.google.dev/gemini-api/docs/thinking (updated 2026-09-04)"
INLINE_LIMITS = (
    "the live service's interactive inline limit, raised to 100 MB in 2026-01; Batch Mode's "
    f"inline requests kept at 20 MB ({DIGEST} Sending images)"
)
NO_SOURCE = ""  # an assumed rule dates nothing


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: what is refused (or produced, or taken), the answer, where the rule comes
    from, and when that source said so (or that it is assumed)."""

    id: str
    answer: str  # HTTP status and status / Interactions code
    description: str
    source: str
    wording: str = "service"  # "service": the service's text; "written": ours (no source)
    dated: str = NO_SOURCE  # the date-bearing source: a page and its date, an SDK version, ...
    assumed: bool = False  # no dated source found: the double's guess


_RULES = (
    # -------------------------------------------------------------------------------- auth, body
    Rule(
        "auth.missing-key",
        "403 PERMISSION_DENIED / 401 authentication",
        "A request without x-goog-api-key (or ?key=) is refused.",
        f"{DIGEST} Errors; {API_ERRORS}",
        dated="UnityGameStudio/Gemini-Unity-Package#1 (2025-10-24: 403 \"Method doesn't allow "
        'unregistered callers"); google-gemini/deprecated-generative-ai-python#463 (2024-07)',
    ),
    Rule(
        "auth.invalid-key",
        "400 INVALID_ARGUMENT (ErrorInfo API_KEY_INVALID) / 401 authentication",
        "A key other than --api-key is refused.",
        f"{DIGEST} Errors; {API_ERRORS}",
        dated='can1357/oh-my-pi#449 (2026-03-16: 400 "API key not valid. Please pass a valid '
        'API key.", ErrorInfo API_KEY_INVALID)',
    ),
    Rule(
        "auth.vertex-unauthenticated",
        "401 UNAUTHENTICATED",
        "Vertex paths: a request without a bearer token (or express-mode key), or with one the "
        "token endpoint did not issue or that has expired on the server's clock.",
        "https://cloud.google.com/vertex-ai/docs/reference/rest (google.rpc.Status); "
        "https://cloud.google.com/docs/authentication/rest",
        assumed=True,
    ),
    Rule(
        "auth.vertex-permission",
        "403 PERMISSION_DENIED",
        "Vertex paths: a token issued for --vertex-project used on another project's path.",
        "https://cloud.google.com/vertex-ai/docs/general/access-control (aiplatform.endpoints."
        "predict, roles/aiplatform.user)",
        "written",
        assumed=True,
    ),
    Rule(
        "vertex.gs-object",
        "400 INVALID_ARGUMENT",
        "Vertex paths: a fileData gs:// URI outside the buckets --gs-root maps, or no such object.",
        "https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/image-understanding",
        "written",
        assumed=True,
    ),
    Rule(
        "vertex.batch",
        "200: JOB_STATE_PENDING -> RUNNING -> SUCCEEDED, predictions.jsonl in the bucket; "
        "400 INVALID_ARGUMENT",
        "batchPredictionJobs: a create takes one JSONL in a mapped gs:// bucket (instancesFormat "
        "jsonl) and a gs:// outputUriPrefix in a mapped bucket (400 otherwise); the job runs as "
        "a Batch Mode job (batch.lifecycle) and writes prediction-model-<id>/predictions.jsonl "
        "under the prefix, a line per request: its input's fields with `response`, or `status` "
        '(`<STATUS>: {"error": {...}}`) when it failed. outputInfo.gcsOutputDirectory is '
        "named from the create on; list takes a display_name filter only.",
        "https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-from-"
        "cloud-storage; SDK batches.py (_CreateBatchJobParameters_to_vertex, "
        "_BatchJob_from_vertex)",
        "written",
        assumed=True,
    ),
    Rule(
        "body.malformed",
        "400 INVALID_ARGUMENT / invalid_request",
        "A body that is not a JSON object is refused.",
        "Google JSON parsing (ESF)",
        "written",
        assumed=True,
    ),
    Rule(
        "body.too-large",
        "400 INVALID_ARGUMENT / invalid_request",
        "A request body above the inline limit is refused, with no 413: 100 MiB for "
        "generateContent, countTokens and Interactions (--inline-limit-mb), 20 MiB for a batch "
        "create carrying its requests inline (--batch-inline-limit-mb, never above the other).",
        f"{DIGEST} Sending images, § Errors",
        dated=f"{INLINE_LIMITS}; google-gemini/deprecated-generative-ai-android#26 (2023-12-21: "
        '"Request payload size exceeds the limit: 4194304 bytes.")',
    ),
    # ------------------------------------------------------------------------------ the wire
    Rule(
        "fields.unknown",
        "400 INVALID_ARGUMENT / 400 parameter_unknown",
        "A field the API does not have, at any depth, is refused and named (camelCase or "
        "snake_case accepted on generateContent, snake_case on Interactions). The accepted "
        "field trees are pipeline/localserver/fields.py. The Interactions message text "
        "(\"Unknown parameter: 'config'.\") is ours; its code is documented.",
        f"{ESF_UNKNOWN}; SDK _GenerateContentParameters_to_mldev, _gaos CreateModelInteraction; "
        f"{API_ERRORS} (parameter_unknown)",
        dated=f"google-gemini/gemini-cli#13972 (2025-11-27); {SDK} "
        "models._GenerateContentParameters_to_mldev",
    ),
    Rule(
        "fields.value",
        "400 INVALID_ARGUMENT / invalid_request",
        "A value of the wrong JSON kind (a string for a number, an object for a string, a list "
        "for a single field, an unknown enum name such as a responseSchema type outside "
        "types.Type) is refused. Enum names are taken in any case on generateContent (the "
        'guides send "low" and "LOW"), exactly on Interactions (lowercase literals in the SDK).',
        f"{ESF_VALUE}; {ESF_UNKNOWN}",
        dated="zereight/gitlab-mcp#166 (2025-07-22: \"Invalid value at '...type' "
        f'(type.googleapis.com/google.ai.generativelanguage.v1beta.Type)"); {SDK} types.Type',
    ),
    Rule(
        "model.unknown",
        "404 NOT_FOUND / 404 model_not_found",
        "A model that is not in the server's model table (pipeline/models.json, plus a run's "
        "[models] entries) is not found.",
        "the service's 404 for unknown models (seen in public reports); models.json",
        dated='wwardaww/gnome-gemini-ai#21 (2025-03-06: "models/gemini-1.0-pro is not found '
        'for API version v1beta, or is not supported for generateContent. ...")',
    ),
    Rule(
        "model.no-interactions",
        "404 NOT_FOUND / 404 model_not_found",
        "An Interactions call to a model whose table entry says interactions: false.",
        f"{DIGEST} Interactions API; models.json `interactions`",
        "written",
        assumed=True,
    ),
    Rule(
        "model.shut-down",
        "404 NOT_FOUND / 404 model_not_found",
        "A model whose table entry is shut down by the server's day (models.json "
        "status.shut_down, on the server's clock) answers as an unknown model does: models.get, "
        "generateContent, countTokens, Interactions and batch create.",
        f"{DEPRECATIONS}; {DIGEST} Models and thinking (the shut-down days); models.json status",
        dated="ai.google.dev/gemini-api/docs/deprecations (read 2026-10: gemini-3-pro-preview "
        "2026-03-09, gemini-2.0-flash 2026-06-01, gemini-2.5-pro 2026-06-17)",
    ),
    Rule(
        "models.get",
        "200 Model",
        "GET /{version}/models/{id}: a Model resource (camelCase, name models/<id>) for each "
        "entry not shut down and each id matching one by prefix: input 1,048,576 and output "
        "65,536 tokens (8,192 on 1.5 and 2.0), thinking as the entry says, the methods the "
        "double serves. An alias answers its own resource naming only itself (baseModelId is "
        "the alias), unless --alias-target states its target. An id not served answers the "
        "404 of model.unknown or model.shut-down, in generateContent's wording (no source "
        "gives models.get's own).",
        f"{MODELS_REFERENCE} (models.get, Model); SDK _Model_from_mldev; {DIGEST} Models and "
        "thinking ('no page states their current targets')",
        "written",
        dated="google-genai 3.6 google/genai/models.py _Model_from_mldev; ai.google.dev/api/models "
        "(read 2026-10)",
    ),
    Rule(
        "models.list",
        "200 {models, nextPageToken} / 400 INVALID_ARGUMENT",
        "GET /{version}/models: the entries not shut down, then the aliases, as models.get "
        "answers each; pageSize 50 when unset, 1,000 at most; a pageSize that is no integer, "
        "or a pageToken this server did not issue, is a 400.",
        f"{MODELS_REFERENCE} (models.list); SDK models.list (Pager); {ESF_VALUE}",
        "written",
        dated="google-genai 3.6 google/genai/models.py Models.list (Pager); ai.google.dev/api/"
        "models (read 2026-10)",
    ),
    Rule(
        "contents.required",
        "400 INVALID_ARGUMENT",
        "generateContent needs a non-empty contents, each with non-empty parts.",
        "the service's field violation text",
        dated='langchain-ai/langchain-google#1393 (2025-11-29: "contents is not specified"); '
        'egoist/chatwise-releases#250 (2025-02-18: "contents.parts must not be empty")',
    ),
    # ------------------------------------------------------------------------------ images
    Rule(
        "image.base64",
        "400 INVALID_ARGUMENT / invalid_request",
        "Inline data that is not base64 (standard or URL-safe, as the SDK sends) is refused.",
        f"{DIGEST} Sending images",
        dated='musistudio/claude-code-router#845 (2025-09-28: "Base64 decoding failed"); '
        f"{SDK} _common.py (bytes sent as URL-safe base64)",
    ),
    Rule(
        "image.mime",
        "400 INVALID_ARGUMENT / invalid_request",
        "generateContent takes image/png, jpeg, webp, heic, heif; the Interactions API also "
        "image/gif, bmp and tiff (the SDK's ImageContentMimeType).",
        f"{DIGEST} Sending images; SDK _gaos/types/interactions/imagecontent.py",
        dated=f"{SDK} _gaos/types/interactions/imagecontent.py ImageContentMimeType",
    ),
    Rule(
        "image.undecodable",
        "400 INVALID_ARGUMENT / invalid_request",
        "Bytes that are no image are refused.",
        "the service's 'Unable to process input image' answer",
        dated='google-gemini/gemini-cli#5064 (2025-07-28: "Unable to process input image. '
        'Please retry or report in ...")',
    ),
    Rule(
        "image.required",
        "400 INVALID_ARGUMENT / invalid_request",
        "An image part without data (or file_uri) or without its MIME type.",
        "ai.google.dev/api/caching#Blob (required fields)",
        "written",
        assumed=True,
    ),
    Rule(
        "file.not-found",
        "403 PERMISSION_DENIED / 403 permission_denied",
        "A file that does not exist, was deleted, or expired (--file-ttl-seconds, 48 h by "
        "default) answers 403, on files.get and when used in a request.",
        f"{DIGEST} Files API",
        dated='googleapis/python-genai#1218 (2025-08-06: 403 "You do not have permission to '
        'access the File ... or it may not exist.")',
    ),
    Rule(
        "file.not-active",
        "400 FAILED_PRECONDITION / failed_precondition",
        "Using a file still PROCESSING (--file-processing-seconds).",
        f"{DIGEST} Files API",
        dated='expectedparrot/edsl#1907 (2025-04-24: "The File ... is not in an ACTIVE state '
        'and usage is not allowed")',
    ),
    # ------------------------------------------------------------------------------ settings
    Rule(
        "thinking.unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "A thinkingConfig sent to a model without thinking (models.json thinking.control none).",
        "https://github.com/immersive-translate/immersive-translate/issues/2976",
        dated='Veloera/Veloera#41 (2025-05-18: 400 "thinking_config is not supported" on '
        "gemini-2.0-flash)",
    ),
    Rule(
        "thinking.both",
        "400 INVALID_ARGUMENT",
        "thinkingBudget together with thinkingLevel.",
        f"{DIGEST} Models and thinking",
        "written",
        dated=f"{THINKING_PAGE}: budget and level together are a 400",
    ),
    Rule(
        "thinking.level-unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "A thinkingLevel sent to a model set by budget (2.5).",
        f"{DIGEST} Models and thinking; https://github.com/RooCodeInc/Roo-Code/issues/10700",
        dated='RooCodeInc/Roo-Code#10700 (2026-01-13: "Thinking level is not supported for '
        'this model." on gemini-2.5-flash)',
    ),
    Rule(
        "thinking.level-value",
        "400 INVALID_ARGUMENT / invalid_request",
        "A level the model does not take (e.g. minimal on 3.7/3.8 Flash, 3 Pro): "
        "models.Thinking.level_error's words.",
        f"{DIGEST} Models and thinking; https://github.com/fishjar/kiss-translator/issues/1048",
        dated=f"fishjar/kiss-translator#1048 (2026-08-21: the answer for minimal on 3.7 Flash); "
        f"{THINKING_PAGE}",
    ),
    Rule(
        "thinking.budget-on-level",
        "200 (taken: no refusal)",
        "A thinkingBudget sent to a model set by level (Gemini 3) is taken: 'no longer "
        "recommended', not refused (models.Thinking.budget_error says what a model refuses). "
        "With a thinkingLevel too it is refused (thinking.both).",
        f"{DIGEST} Models and thinking",
        dated=f"{THINKING_PAGE}: a numeric thinkingBudget on 3.x is 'no longer recommended'",
    ),
    Rule(
        "thinking.budget-range",
        "400 INVALID_ARGUMENT",
        "A budget outside the model's range (2.5 Pro refuses 0): models.Thinking.budget_error.",
        f"{DIGEST} Models and thinking; https://github.com/RooCodeInc/Roo-Code/issues/4399",
        dated='ChatLunaLab/chatluna#519 (2025-07-21: "Budget 0 is invalid. This model only '
        f'works in thinking mode." on 2.5 Pro); {THINKING_PAGE}',
    ),
    Rule(
        "schema.both",
        "400 INVALID_ARGUMENT",
        "responseSchema together with responseJsonSchema.",
        "ai.google.dev/api/generate-content#GenerationConfig (responseJsonSchema: 'If this is "
        "set, responseSchema must be omitted')",
        "written",
        dated=f"{SDK} types.GenerateContentConfig.response_json_schema ('If set, "
        "response_schema must be omitted')",
    ),
    Rule(
        "schema.json-unsupported",
        "400 INVALID_ARGUMENT",
        "responseJsonSchema sent to a model whose table entry says json_schema: false.",
        "models.json `json_schema`",
        "written",
        assumed=True,
    ),
    Rule(
        "schema.json-invalid",
        "400 INVALID_ARGUMENT",
        "A responseJsonSchema the JSON Schema meta-schema refuses (e.g. type 'strin'), checked "
        "with the jsonschema library (its $schema's draft, else 2020-12). (A responseSchema is "
        "held to the OpenAPI subset's fields and types.Type names by fields.unknown and "
        "fields.value.)",
        "the service's answer to a malformed JSON Schema",
        dated='iBUHub/AIStudioToAPI#265 (2026-09-10: 400 "Request contains an invalid '
        'argument." for a JSON Schema on gemini-3.5-flash-lite); nspady/google-calendar-mcp#134 '
        '(2025-11-27: type "int" for "integer")',
    ),
    Rule(
        "media.global-value",
        "400 INVALID_ARGUMENT",
        "generationConfig.mediaResolution takes LOW, MEDIUM, HIGH only: ULTRA_HIGH is no value "
        "of that enum (the service's invalid-enum answer).",
        f"{DIGEST} Image tokens; SDK types.MediaResolution; {ESF_VALUE}",
        dated=f"{MEDIA_PAGE}; {SDK} types.MediaResolution",
    ),
    Rule(
        "media.global-model",
        "400 INVALID_ARGUMENT",
        "A global media resolution the model does not take (models.json media_resolution).",
        "models.json `media_resolution`",
        "written",
        assumed=True,
    ),
    Rule(
        "media.part-version",
        "400 INVALID_ARGUMENT",
        "A Part's mediaResolution on an API version the model's table entry does not list "
        "(models.json part_media_resolution: v1alpha, and v1beta since the page's update) is an "
        "unknown field there.",
        f"{DIGEST} Image tokens ('available in the v1beta API version'; v1alpha-only earlier)",
        dated=f"{MEDIA_PAGE}: per-part media resolution on v1beta",
    ),
    Rule(
        "media.part-v1",
        "200 (taken: no refusal)",
        "On v1 a Part's mediaResolution is taken wherever the model's table entry lists v1beta "
        "(model_checks.part_resolution_on).",
        "no source shows v1 refusing it; the SDK sends it on every version "
        "(models._Part_to_mldev), and v1 is its default (_api_client)",
        assumed=True,
    ),
    Rule(
        "media.part-model",
        "400 INVALID_ARGUMENT / invalid_request",
        "A per-part media resolution (or an Interactions image resolution) on a model whose "
        "table entry has no part_media_resolution (2.x).",
        f"{DIGEST} Image tokens ('documented for Gemini 3'); models.json",
        "written",
        dated=f"{MEDIA_PAGE}: per-part resolution documented for Gemini 3",
    ),
    # ------------------------------------------------------------------------------ Interactions
    Rule(
        "interactions.schema-types",
        "400 invalid_request",
        "response_format.schema is JSON Schema: a type name that is not one of its seven "
        "(the OpenAPI subset's upper-case ARRAY, OBJECT, ..., a misspelt 'strin') is refused.",
        f"{DIGEST} Interactions API ('The schema is JSON Schema: lowercase type names')",
        "written",
        dated=f"{SDK} _gaos/types/interactions/textresponseformat.py (schema: a JSON schema)",
    ),
    Rule(
        "interactions.schema-invalid",
        "400 invalid_request",
        "A response_format.schema the JSON Schema meta-schema refuses otherwise (as "
        "schema.json-invalid), named with where and why.",
        "by analogy with generateContent's answer (schema.json-invalid); the code is the "
        f"documented one for a malformed request ({API_ERRORS})",
        "written",
        assumed=True,
    ),
    Rule(
        "interactions.required",
        "400 invalid_request",
        "A create body without model, or without input (unless it continues a stored interaction).",
        "_gaos CreateModelInteraction (model is required); ai.google.dev/api/interactions-api",
        "written",
        dated=f"{SDK} _gaos/types/interactions/createmodelinteraction.py (model required)",
    ),
    Rule(
        "interactions.continuation",
        "400 invalid_request",
        "A continuation_token the server did not issue, already used, or sent with another "
        "request than the one it continues.",
        f"{DIGEST} Interactions API (Continuation); SDK _interactions_continuation",
        "written",
        dated=f"{SDK} _interactions_continuation.py",
    ),
    Rule(
        "interactions.not-found",
        "404 not_found",
        "GET/DELETE of an interaction that was not stored (store: false) or was deleted.",
        API_ERRORS,
        "written",
        assumed=True,
    ),
    # ------------------------------------------------------------------------------ uploads
    Rule(
        "upload.protocol",
        "400 INVALID_ARGUMENT (409 ALREADY_EXISTS for a name taken)",
        "Only the resumable protocol (X-Goog-Upload-Protocol: resumable, Command: start) with "
        "the file's size; a file name 'files/' + up to 40 of [a-z0-9-], not taken; at most "
        "2 GB; a page token files.list issued.",
        f"{DIGEST} Files API; SDK files.upload",
        "written",
        dated=f"{SDK} files.upload, _api_client (the resumable start)",
    ),
    Rule(
        "upload.chunk-granularity",
        "400 INVALID_ARGUMENT",
        "The start answer announces X-Goog-Upload-Chunk-Granularity: 262144; a non-final chunk "
        "whose size is not a multiple of it is refused (the session stays active).",
        f"{DIGEST} Files API; wording after Google's upload service ('The number of bytes "
        "uploaded is required to be ... 262144, except for the final request'), "
        "https://github.com/googleapis/gcs-resumable-upload/issues/17",
        "written",
        dated="googleapis/gcs-resumable-upload#17 (2016-10-18: the upload service's answer to "
        "a chunk off the 262144 granularity)",
    ),
    Rule(
        "upload.offset",
        "400 INVALID_ARGUMENT",
        "X-Goog-Upload-Offset must equal the bytes received; the size must match the start.",
        f"{DIGEST} Files API",
        "written",
        dated=f"{SDK} _api_client.py (X-Goog-Upload-Offset of each chunk)",
    ),
    Rule(
        "upload.session",
        "404 NOT_FOUND",
        "A chunk sent to an upload session that ended or never existed.",
        f"{DIGEST} Files API",
        "written",
        assumed=True,
    ),
    # ------------------------------------------------------------------------------ limits
    Rule(
        "quota.exceeded",
        "429 RESOURCE_EXHAUSTED (QuotaFailure, RetryInfo) / 429 rate_limit_exceeded or "
        "quota_exceeded (daily), retry-after-ms and Retry-After headers",
        "--rpm/--tpm/--rpd per model in calendar-minute windows and the Pacific day; every "
        "limit hit at once is listed (per-minute first, per-day last); RetryInfo is the longest "
        "wait.",
        f"{DIGEST} Errors, § Rate limits; {API_ERRORS}; SDK _gaos retries (retry-after-ms)",
        dated=f"{SDK} _gaos/utils/retries.py (retry-after-ms, Retry-After); "
        "googleapis/python-genai#1901 (2025-12-31: 429 RESOURCE_EXHAUSTED)",
    ),
    Rule(
        "credits.depleted",
        "402 RESOURCE_EXHAUSTED / 402 payment_required",
        "--credit-budget USD billed at the model table's interactive price; once spent every "
        "generation answers 402 (uploads stay free).",
        "https://discuss.ai.google.dev/t/api-update-depleted-prepay-credits-now-return-http-402-"
        f"instead-of-429/183654; {API_ERRORS} (payment_required)",
        dated="discuss.ai.google.dev/t/.../170539 (2026-06-09: the 'Your prepayment credits "
        "are depleted' text, then under a 429; the 402 thread above is later and undated)",
    ),
    Rule(
        "interactions.decode-limit",
        "200 status requires_continuation + continuation_token",
        "--decode-limit N: an Interactions answer longer than N output tokens comes in hops; "
        "each hop re-bills the input, bills its own output, and counts against the quotas.",
        f"{DIGEST} Interactions API (Continuation); SDK _interactions_continuation",
        dated=f"{SDK} _interactions_continuation.py (automatic continuation)",
    ),
    # ------------------------------------------------------------------------------ billing
    Rule(
        "billing.implicit-cache",
        "200 usageMetadata.cachedContentTokenCount / usage.total_cached_tokens",
        "--implicit-cache: a request whose leading pieces (system instruction, then its texts "
        "and images in the order sent) repeat those of a request of the same model answered "
        "within 5 minutes, for at least the model's caching minimum (2,048 tokens on 2.5, "
        "4,096 on 3.x; none before 2.5), reports those tokens as cached; credits bill them at "
        "the model table's cached rate. Off by default; Batch Mode lines are not cached. When "
        "the service caches is its own (caching.py: the double's rule is an assumption).",
        "https://ai.google.dev/gemini-api/docs/pricing (read 2026-10: cached input prices); "
        "https://ai.google.dev/gemini-api/docs/caching (read 2026-10: implicit caching on 2.5 "
        "and newer, minimum tokens per model, usage.total_cached_tokens)",
        "written",
        assumed=True,  # when the service caches is its own: the 5-minute window is ours
    ),
    Rule(
        "billing.context-cache",
        "200 usageMetadata.cachedContentTokenCount",
        "A generateContent request naming a cached content (cachedContent) is read with the "
        "cache's system instruction and contents first; its promptTokenCount counts them and "
        "cachedContentTokenCount reports the cache's totalTokenCount, billed at the cached rate "
        "(the implicit cache is not consulted for it). Storage is not billed by the double.",
        "https://ai.google.dev/api/caching (CachedContent.usageMetadata); "
        "https://ai.google.dev/gemini-api/docs/pricing (read 2026-10: cached input prices and "
        "storage per 1M tokens per hour)",
        "written",
        dated="ai.google.dev/gemini-api/docs/pricing (read 2026-10)",
    ),
    # ------------------------------------------------------------------------------ caches
    Rule(
        "cache.too-small",
        "400 INVALID_ARGUMENT",
        "A cachedContents create whose system instruction and contents count fewer tokens "
        "than the model's minimum (the model table's cache_min_tokens: 2,048 on 2.5, 4,096 on "
        "3.x) is refused: 'Cached content is too small. total_token_count=N, "
        "min_total_token_count=M'.",
        "https://ai.google.dev/gemini-api/docs/caching (minimum input tokens per model); the "
        "message as seen live: BerriAI/litellm#17696, zyddnys/manga-image-translator#929",
        dated="BerriAI/litellm#17696 (2025-12-09: 'Cached content is too small. "
        "total_token_count=896, min_total_token_count=1024' from gemini-2.5-flash)",
    ),
    Rule(
        "cache.not-found",
        "404 NOT_FOUND",
        "get, PATCH or delete of a cached content that never existed, was deleted or has "
        "expired (its expireTime passed on the server clock), and a generateContent request "
        "naming one: 'CachedContent not found (or permission denied)'. The live service may "
        "answer a request naming a gone cache with 403 PERMISSION_DENIED instead: a client "
        "should take either.",
        "https://ai.google.dev/api/caching (expireTime: when the resource is considered expired)",
        "written",
        assumed=True,  # the code (404 or 403) of a request naming a gone cache
    ),
    Rule(
        "cache.model",
        "400 INVALID_ARGUMENT (404 NOT_FOUND for a model that caches nothing)",
        "A generateContent request must use the model its cached content was created for "
        "('Model used by GenerateContent request (models/A) and CachedContent (models/B) has "
        "to be the same.'); a create for a model without context caching (before 2.5) is a "
        "404 as for any method the model does not serve.",
        "googleapis/python-aiplatform#5271 (google-genai refuses a cache used with another "
        "model); https://ai.google.dev/gemini-api/docs/caching (2.5 and newer)",
        "written",
        dated="googleapis/python-aiplatform#5271 (2025-04-28)",
    ),
    Rule(
        "cache.request",
        "400 INVALID_ARGUMENT",
        "A generateContent request naming a cached content may not set systemInstruction, "
        "tools or toolConfig (they belong in the cache): 'Tool config, tools and system "
        "instruction should not be set in the request when using cached content.'",
        "567-labs/instructor#2580 (the developer API's message); vercel/ai#3333 (the earlier "
        "'CachedContent can not be used with GenerateContent request setting ...')",
        dated="567-labs/instructor#2580 (2026-08-31: the 400 INVALID_ARGUMENT text)",
    ),
    Rule(
        "cache.expiration",
        "400 INVALID_ARGUMENT",
        "A create or PATCH sets ttl (a Duration, '300s') or expireTime (RFC 3339), not both (a "
        "create with neither lives an hour); a PATCH changes the expiration only (updateMask "
        "ttl / expireTime) and must give it.",
        "https://ai.google.dev/api/caching (expiration: one of expireTime, ttl; the update "
        "method); https://ai.google.dev/gemini-api/docs/caching (TTL defaults to 1 hour); SDK "
        "caches.update",
        "written",
        dated=f"{SDK} caches._UpdateCachedContentConfig_to_mldev (ttl, expire_time)",
    ),
    Rule(
        "billing.long-prompt",
        "200 (credits and the pipeline's bill)",
        "A request whose prompt passes its price's long_above (200,000 on the Pro models) is "
        "billed wholly at the long tier (2.5 Pro 2.50 / 15.00, 3.1 Pro 4.00 / 18.00 per 1M).",
        "https://ai.google.dev/gemini-api/docs/pricing (read 2026-10); models.json `prices`",
        "written",
        dated="ai.google.dev/gemini-api/docs/pricing (read 2026-10: 'prompts > 200k tokens')",
    ),
    Rule(
        "billing.pan-and-scan",
        "200 usageMetadata.promptTokenCount",
        "2.x with generationConfig.mediaResolution HIGH bills 256 tokens an image plus 256 a "
        "pan-and-scan crop: none for an image whose long side is under 1.2 times its short "
        "side, else round(long / short) crops along the long side, 2 to 8, none under 256 px "
        "(so 256 to 2,304 an image). The page gives only '256 + Pan & Scan' and ~2,048 more at "
        "most: the crop count is an assumption after Gemma 3's Pan & Scan "
        "(pipeline/gemini/tokens.py), and `estimate` states the whole range.",
        f"{DIGEST} Image tokens (the media-resolution page, 2026-09-19); Gemma 3 technical "
        "report (Pan & Scan); transformers Gemma3ImageProcessor.pan_and_scan",
        "written",
        assumed=True,  # the crop count; the range is the media-resolution page's (2026-09-19)
    ),
    Rule(
        "faults.injected",
        "500 INTERNAL, 503 UNAVAILABLE, 504 after a hang; or a 200 cut at MAX_TOKENS, fenced "
        "JSON, out-of-range boxes, masks without their data: prefix",
        "--fault-rate F with --seed S: seeded faults the client must survive (faults.py).",
        f"{DIGEST} Errors, § Recommended settings and known failure modes",
        dated='google-gemini/gemini-cli#4443 (2025-07-18: 503 "The model is overloaded. Please '
        'try again later.")',
    ),
    # ------------------------------------------------------------------------------ Batch Mode
    Rule(
        "batch.lifecycle",
        "200: BATCH_STATE_PENDING -> RUNNING -> SUCCEEDED | EXPIRED | CANCELLED | FAILED",
        "A job is PENDING for the first tenth of --batch-seconds, RUNNING while its lines are "
        "answered (each as generateContent would answer it, faults drawn per line, no quotas: "
        "Batch Mode has its own), SUCCEEDED once --batch-seconds have passed and every line is "
        "answered, with its results in a generated file `files/batch-<id>` (file input) or "
        "inline (inline input); EXPIRED, without results, when --batch-expiry-seconds (48 h) "
        "pass first; a refused line or an injected 500/503/deadline is that line's `error` (a "
        "google.rpc.Status with its RPC code). Billed at the batch price.",
        f"{DIGEST} Batch Mode; SDK batches.py, types.JobState",
        dated=f"{SDK} batches.py, types.JobState",
    ),
    Rule(
        "batch.limit",
        "429 RESOURCE_EXHAUSTED (Help link)",
        "A create beyond --batch-max-jobs unfinished jobs (100), or beyond --batch-enqueued-tokens "
        "input tokens enqueued for the model, is refused.",
        f"{DIGEST} Batch Mode (100 concurrent jobs, per-model enqueued-token caps); {BATCH_QUOTA}",
        dated="langchain4j/langchain4j#3942 (2026-01-12: the 429 of a batch create); "
        "googleapis/python-genai#1901 (2025-12-31: enqueued tokens)",
    ),
    Rule(
        "batch.output-delay",
        "200: BATCH_STATE_SUCCEEDED, done, without output",
        "--batch-output-delay S: a job that succeeded reports BATCH_STATE_SUCCEEDED and done "
        "for S seconds before its output (responsesFile, or the inline answers) is attached; a "
        "collector must keep polling, not count its requests as unanswered.",
        "https://github.com/tidyverse/ellmer/pull/926 (seen live with gemini-2.5-flash and "
        "gemini-3-flash-preview: 'Keeps polling when BATCH_STATE_SUCCEEDED but output file "
        "isn't available yet')",
        dated="tidyverse/ellmer#926 (reviewed 2026-05-15: Gemini batch support that keeps "
        "polling a SUCCEEDED job until its output file is there)",
    ),
    Rule(
        "batch.list-lag",
        "200: the job list without the newest jobs",
        "--batch-list-lag S: a job shows in GET batches only S seconds (server clock) after its "
        "create; GET batches/{id} finds it at once. A client that looks a job up by display name "
        "must not take 'not listed' for 'never created'.",
        "issue 19 (a job list seen 3 s behind creates); no documentation promises the list is "
        "consistent with creates",
        "written",
        assumed=True,
    ),
    Rule(
        "batch.create-delay",
        "200, late",
        "--batch-create-delay S: a create's answer comes S seconds (real time) after the job was "
        "made: a create in flight while the client polls, lists and times out.",
        "fault injection of the local server (a slow answer: the job exists before the client "
        "knows its name)",
        "written",
        assumed=True,
    ),
    Rule(
        "batch.cancel-partial",
        "200: BATCH_STATE_CANCELLED, done, with the output of the lines answered before",
        ":cancel of a job with answered lines keeps them: the cancelled job carries them as its "
        "output (responsesFile or inline answers) and its batchStats count them; a job cancelled "
        "before any answer has no output.",
        "no Gemini source found (other batch services keep a cancelled job's partial results, "
        "e.g. DigitalOcean's batch inference docs, 2026-10-27); the answers were billed",
        "written",
        assumed=True,
    ),
    Rule(
        "batch.corrupt-line",
        "200: one result unreadable",
        "--batch-corrupt-line N (a fault injection): the Nth result of every job is unreadable: "
        "its results file's line cut in half (the key, first in the line, survives when the cut "
        "falls after it), or its inline answer's response a string instead of an object.",
        "fault injection of the local server (a truncated or damaged download)",
        "written",
        assumed=True,
    ),
    Rule(
        "batch.input",
        "400 INVALID_ARGUMENT",
        "A create needs exactly one of inputConfig.fileName (an ACTIVE file of this project: "
        "403 / 400 otherwise, as for any file) and a non-empty inputConfig.requests.requests.",
        "SDK t_batch_job_source ('Exactly one of ... must be set')",
        "written",
        dated=f"{SDK} _transformers.t_batch_job_source",
    ),
    Rule(
        "batch.input-format",
        "200: the job ends BATCH_STATE_FAILED with an error",
        "An input file with a line that is not a JSON object fails the whole job.",
        f"{DIGEST} Batch Mode (one JSON object a line)",
        "written",
        assumed=True,
    ),
    Rule(
        "batch.not-found",
        "404 NOT_FOUND",
        "get, :cancel or delete of a job that does not exist (or was deleted).",
        "SDK batches.get / cancel / delete",
        "written",
        dated=f"{SDK} batches.get, cancel, delete",
    ),
    Rule(
        "batch.state",
        "400 FAILED_PRECONDITION",
        ":cancel of a job that already ended.",
        "SDK batches.cancel ('Only available for batch jobs that are running or pending')",
        "written",
        dated=f"{SDK} batches.cancel ('Only available for batch jobs that are running or pending')",
    ),
    Rule(
        "model.no-batch",
        "404 NOT_FOUND",
        "batchGenerateContent for a model whose table entry says batch: false.",
        f"{DIGEST} Batch Mode; models.json `batch`",
        "written",
        assumed=True,
    ),
    Rule(
        "file.download",
        "400 INVALID_ARGUMENT",
        "files/{id}:download is for generated files (batch results) only, with alt=media.",
        "SDK Files.download ('Only generated files can be downloaded, uploaded files can't be "
        "downloaded')",
        "written",
        dated=f"{SDK} files.Files.download",
    ),
    # ------------------------------------------------------------------------------ the double
    Rule(
        "simulation.settings",
        "200: the answer a poorer setting would give (a simulation)",
        simulation.describe(),
        "the double's own model of what a model loses with its setting "
        "(pipeline/localserver/simulation.py, its parameters in one table); no source measures it",
        "written",
        assumed=True,
    ),
    Rule(
        "double.unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "What the service takes but the double cannot answer: stream, background, agents, "
        "non-image media, methods other than generateContent/countTokens.",
        "limits of the local server (not of the service)",
        "written",
        assumed=True,
    ),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}


def rule(rule_id: str) -> Rule:
    """The rule with this id; KeyError names an id no validator may cite."""
    return RULES[rule_id]


def describe_rules() -> list[str]:
    """The registry as `pipeline serve-local --rules` prints it, a blank line after each."""
    lines = []
    for entry in _RULES:
        lines.append(f"{entry.id}  [{entry.answer}]")
        lines.append(f"    {entry.description}")
        lines.append(f"    source: {entry.source} (wording: {entry.wording})")
        lines.append(f"    {_dating(entry)}")
        lines.append("")
    return lines


def _dating(entry: Rule) -> str:
    if entry.assumed:
        return "assumed: no dated source (the double's guess; revisit when the service differs)"
    return f"dated: {entry.dated}"
