"""Every rule the local server enforces or behaviour it produces, with its source: one registry.

The server is a strict double of the real service: it refuses what the service refuses, with the
service's answer. Each refusal it makes names a rule id from `RULES` (errors carry it as
`ApiError.rule`, and `/local/stats` counts refusals by rule), so a newcomer can go from a
refused request to the reason and its source in one look. `pipeline serve-local --rules` prints
the table.

`wording` says where the message text comes from: "service" when it is the service's own text
(a documented answer or one seen in public reports, named in `source`), "written" when no source
gives it and the text is ours, written to say the same thing plainly.

Sources: "docs/gemini-api.md § X" is a section of the project's digest of the Gemini API
documentation (its Sources section names the public pages); "SDK" names a function of google-genai
3.6 (https://github.com/googleapis/python-genai, under `google/genai/`); URLs are public
documentation or issue threads.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: what is refused (or produced), the answer, where the rule comes from."""

    id: str
    answer: str  # HTTP status and status / Interactions code
    description: str
    source: str
    wording: str = "service"  # "service": the service's text; "written": ours (no source)


_RULES = (
    # -------------------------------------------------------------------------------- auth, body
    Rule(
        "auth.missing-key",
        "403 PERMISSION_DENIED / 401 authentication",
        "A request without x-goog-api-key (or ?key=) is refused.",
        f"{DIGEST} Errors; {API_ERRORS}",
    ),
    Rule(
        "auth.invalid-key",
        "400 INVALID_ARGUMENT (ErrorInfo API_KEY_INVALID) / 401 authentication",
        "A key other than --api-key is refused.",
        f"{DIGEST} Errors; {API_ERRORS}",
    ),
    Rule(
        "body.malformed",
        "400 INVALID_ARGUMENT / invalid_request",
        "A body that is not a JSON object is refused.",
        "Google JSON parsing (ESF)",
        "written",
    ),
    Rule(
        "body.too-large",
        "400 INVALID_ARGUMENT / invalid_request",
        "A request body above the inline limit (--inline-limit-mb, 20 MiB) is refused; no 413.",
        f"{DIGEST} Sending images, § Errors",
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
    ),
    Rule(
        "fields.value",
        "400 INVALID_ARGUMENT / invalid_request",
        "A value of the wrong JSON kind (a string for a number, an object for a string, a list "
        "for a single field, an unknown enum name) is refused. Enum names are taken in any "
        'case on generateContent (the guides send "low" and "LOW"), exactly on '
        "Interactions (lowercase literals in the SDK).",
        f"{ESF_VALUE}; {ESF_UNKNOWN}",
    ),
    Rule(
        "model.unknown",
        "404 NOT_FOUND / 404 model_not_found",
        "A model that is not in the model table (pipeline/models.json) is not found.",
        "the service's 404 for unknown models (seen in public reports); models.json",
    ),
    Rule(
        "model.no-interactions",
        "404 NOT_FOUND / 404 model_not_found",
        "An Interactions call to a model whose table entry says interactions: false.",
        f"{DIGEST} Interactions API; models.json `interactions`",
        "written",
    ),
    Rule(
        "model.shut-down",
        "404 NOT_FOUND / 404 model_not_found",
        "A model whose table entry is shut down by the server's day (models.json "
        "status.shut_down, on the server's clock) answers as an unknown model does: models.get, "
        "generateContent, countTokens, Interactions and batch create.",
        f"{DEPRECATIONS}; {DIGEST} Models and thinking (the shut-down days); models.json status",
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
    ),
    Rule(
        "models.list",
        "200 {models, nextPageToken} / 400 INVALID_ARGUMENT",
        "GET /{version}/models: the entries not shut down, then the aliases, as models.get "
        "answers each; pageSize 50 when unset, 1,000 at most; a pageSize that is no integer, "
        "or a pageToken this server did not issue, is a 400.",
        f"{MODELS_REFERENCE} (models.list); SDK models.list (Pager); {ESF_VALUE}",
        "written",
    ),
    Rule(
        "contents.required",
        "400 INVALID_ARGUMENT",
        "generateContent needs a non-empty contents, each with non-empty parts.",
        "the service's field violation text",
    ),
    # ------------------------------------------------------------------------------ images
    Rule(
        "image.base64",
        "400 INVALID_ARGUMENT / invalid_request",
        "Inline data that is not base64 (standard or URL-safe, as the SDK sends) is refused.",
        f"{DIGEST} Sending images",
    ),
    Rule(
        "image.mime",
        "400 INVALID_ARGUMENT / invalid_request",
        "Only image/png, jpeg, webp, heic, heif are taken.",
        f"{DIGEST} Sending images",
    ),
    Rule(
        "image.undecodable",
        "400 INVALID_ARGUMENT / invalid_request",
        "Bytes that are no image are refused.",
        "the service's 'Unable to process input image' answer",
    ),
    Rule(
        "image.required",
        "400 INVALID_ARGUMENT / invalid_request",
        "An image part without data (or file_uri) or without its MIME type.",
        "ai.google.dev/api/caching#Blob (required fields)",
        "written",
    ),
    Rule(
        "file.not-found",
        "403 PERMISSION_DENIED / 403 permission_denied",
        "A file that does not exist, was deleted, or expired (--file-ttl-seconds, 48 h by "
        "default) answers 403, on files.get and when used in a request.",
        f"{DIGEST} Files API",
    ),
    Rule(
        "file.not-active",
        "400 FAILED_PRECONDITION / failed_precondition",
        "Using a file still PROCESSING (--file-processing-seconds).",
        f"{DIGEST} Files API",
    ),
    # ------------------------------------------------------------------------------ settings
    Rule(
        "thinking.unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "A thinkingConfig sent to a model without thinking (models.json thinking.control none).",
        "https://github.com/immersive-translate/immersive-translate/issues/2976",
    ),
    Rule(
        "thinking.both",
        "400 INVALID_ARGUMENT",
        "thinkingBudget together with thinkingLevel.",
        f"{DIGEST} Models and thinking",
        "written",
    ),
    Rule(
        "thinking.level-unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "A thinkingLevel sent to a model set by budget (2.5).",
        f"{DIGEST} Models and thinking; https://github.com/RooCodeInc/Roo-Code/issues/10700",
    ),
    Rule(
        "thinking.level-value",
        "400 INVALID_ARGUMENT / invalid_request",
        "A level the model does not take (e.g. minimal on 3.7/3.8 Flash, 3 Pro): "
        "models.Thinking.level_error's words.",
        f"{DIGEST} Models and thinking; https://github.com/fishjar/kiss-translator/issues/1048",
    ),
    Rule(
        "thinking.budget-unsupported",
        "400 INVALID_ARGUMENT",
        "A thinkingBudget sent to a model set by level (Gemini 3): models.Thinking.budget_error.",
        f"{DIGEST} Models and thinking, which calls a budget on 3.x 'no longer recommended' "
        "(not refused): the double is stricter than the service here",
        "written",
    ),
    Rule(
        "thinking.budget-range",
        "400 INVALID_ARGUMENT",
        "A budget outside the model's range (2.5 Pro refuses 0): models.Thinking.budget_error.",
        f"{DIGEST} Models and thinking; https://github.com/RooCodeInc/Roo-Code/issues/4399",
    ),
    Rule(
        "schema.both",
        "400 INVALID_ARGUMENT",
        "responseSchema together with responseJsonSchema.",
        "ai.google.dev/api/generate-content#GenerationConfig (responseJsonSchema: 'If this is "
        "set, responseSchema must be omitted')",
        "written",
    ),
    Rule(
        "schema.json-unsupported",
        "400 INVALID_ARGUMENT",
        "responseJsonSchema sent to a model whose table entry says json_schema: false.",
        "models.json `json_schema`",
        "written",
    ),
    Rule(
        "media.global-value",
        "400 INVALID_ARGUMENT",
        "generationConfig.mediaResolution takes LOW, MEDIUM, HIGH only: ULTRA_HIGH is no value "
        "of that enum (the service's invalid-enum answer).",
        f"{DIGEST} Image tokens; SDK types.MediaResolution; {ESF_VALUE}",
    ),
    Rule(
        "media.global-model",
        "400 INVALID_ARGUMENT",
        "A global media resolution the model does not take (models.json media_resolution).",
        "models.json `media_resolution`",
        "written",
    ),
    Rule(
        "media.part-version",
        "400 INVALID_ARGUMENT",
        "A per-part mediaResolution off v1alpha: the Part of v1beta and v1 has no such field.",
        f"{DIGEST} Image tokens ('it was v1alpha-only earlier'; v1beta, documented since "
        "2026-09-19, is not followed here yet)",
    ),
    Rule(
        "media.part-model",
        "400 INVALID_ARGUMENT / invalid_request",
        "A per-part media resolution (or an Interactions image resolution) on a model whose "
        "table entry has no part_media_resolution for this API version (2.x).",
        f"{DIGEST} Image tokens ('documented for Gemini 3'); models.json",
        "written",
    ),
    # ------------------------------------------------------------------------------ Interactions
    Rule(
        "interactions.schema-types",
        "400 invalid_request",
        "response_format.schema is JSON Schema: upper-case type names (ARRAY, OBJECT, ...) of "
        "the OpenAPI subset are refused.",
        f"{DIGEST} Interactions API ('The schema is JSON Schema: lowercase type names')",
        "written",
    ),
    Rule(
        "interactions.required",
        "400 invalid_request",
        "A create body without model, or without input (unless it continues a stored interaction).",
        "_gaos CreateModelInteraction (model is required); ai.google.dev/api/interactions-api",
        "written",
    ),
    Rule(
        "interactions.continuation",
        "400 invalid_request",
        "A continuation_token the server did not issue, already used, or sent with another "
        "request than the one it continues.",
        f"{DIGEST} Interactions API (Continuation); SDK _interactions_continuation",
        "written",
    ),
    Rule(
        "interactions.not-found",
        "404 not_found",
        "GET/DELETE of an interaction that was not stored (store: false) or was deleted.",
        API_ERRORS,
        "written",
    ),
    # ------------------------------------------------------------------------------ uploads
    Rule(
        "upload.protocol",
        "400 INVALID_ARGUMENT",
        "Only the resumable protocol (X-Goog-Upload-Protocol: resumable, Command: start) with "
        "the file's size; a file name 'files/' + up to 40 of [a-z0-9-], not taken; at most "
        "2 GB; a page token files.list issued.",
        f"{DIGEST} Files API; SDK files.upload",
        "written",
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
    ),
    Rule(
        "upload.offset",
        "400 INVALID_ARGUMENT",
        "X-Goog-Upload-Offset must equal the bytes received; the size must match the start.",
        f"{DIGEST} Files API",
        "written",
    ),
    Rule(
        "upload.session",
        "404 NOT_FOUND",
        "A chunk sent to an upload session that ended or never existed.",
        f"{DIGEST} Files API",
        "written",
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
    ),
    Rule(
        "credits.depleted",
        "402 RESOURCE_EXHAUSTED / 402 payment_required",
        "--credit-budget USD billed at the model table's interactive price; once spent every "
        "generation answers 402 (uploads stay free).",
        "https://discuss.ai.google.dev/t/api-update-depleted-prepay-credits-now-return-http-402-"
        f"instead-of-429/183654; {API_ERRORS} (payment_required)",
    ),
    Rule(
        "interactions.decode-limit",
        "200 status requires_continuation + continuation_token",
        "--decode-limit N: an Interactions answer longer than N output tokens comes in hops; "
        "each hop re-bills the input, bills its own output, and counts against the quotas.",
        f"{DIGEST} Interactions API (Continuation); SDK _interactions_continuation",
    ),
    Rule(
        "faults.injected",
        "500 INTERNAL, 503 UNAVAILABLE, 504 after a hang; or a 200 cut at MAX_TOKENS, fenced "
        "JSON, out-of-range boxes, masks without their data: prefix",
        "--fault-rate F with --seed S: seeded faults the client must survive (faults.py).",
        f"{DIGEST} Errors, § Recommended settings and known failure modes",
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
    ),
    Rule(
        "batch.limit",
        "429 RESOURCE_EXHAUSTED (Help link)",
        "A create beyond --batch-max-jobs unfinished jobs (100), or beyond --batch-enqueued-tokens "
        "input tokens enqueued for the model, is refused.",
        f"{DIGEST} Batch Mode (100 concurrent jobs, per-model enqueued-token caps); {BATCH_QUOTA}",
    ),
    Rule(
        "batch.input",
        "400 INVALID_ARGUMENT",
        "A create needs exactly one of inputConfig.fileName (an ACTIVE file of this project: "
        "403 / 400 otherwise, as for any file) and a non-empty inputConfig.requests.requests.",
        "SDK t_batch_job_source ('Exactly one of ... must be set')",
        "written",
    ),
    Rule(
        "batch.input-format",
        "200: the job ends BATCH_STATE_FAILED with an error",
        "An input file with a line that is not a JSON object fails the whole job.",
        f"{DIGEST} Batch Mode (one JSON object a line)",
        "written",
    ),
    Rule(
        "batch.not-found",
        "404 NOT_FOUND",
        "get, :cancel or delete of a job that does not exist (or was deleted).",
        "SDK batches.get / cancel / delete",
        "written",
    ),
    Rule(
        "batch.state",
        "400 FAILED_PRECONDITION",
        ":cancel of a job that already ended.",
        "SDK batches.cancel ('Only available for batch jobs that are running or pending')",
        "written",
    ),
    Rule(
        "model.no-batch",
        "404 NOT_FOUND",
        "batchGenerateContent for a model whose table entry says batch: false.",
        f"{DIGEST} Batch Mode; models.json `batch`",
        "written",
    ),
    Rule(
        "file.download",
        "400 INVALID_ARGUMENT",
        "files/{id}:download is for generated files (batch results) only, with alt=media.",
        "SDK Files.download ('Only generated files can be downloaded, uploaded files can't be "
        "downloaded')",
        "written",
    ),
    # ------------------------------------------------------------------------------ the double
    Rule(
        "double.unsupported",
        "400 INVALID_ARGUMENT / invalid_request",
        "What the service takes but the double cannot answer: stream, background, agents, "
        "non-image media, methods other than generateContent/countTokens.",
        "limits of the local server (not of the service)",
        "written",
    ),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}


def rule(rule_id: str) -> Rule:
    """The rule with this id; KeyError names an id no validator may cite."""
    return RULES[rule_id]


def describe_rules() -> list[str]:
    """The registry as `pipeline serve-local --rules` prints it."""
    lines = []
    for entry in _RULES:
        lines.append(f"{entry.id}  [{entry.answer}]")
        lines.append(f"    {entry.description}")
        lines.append(f"    source: {entry.source} (wording: {entry.wording})")
    return lines
