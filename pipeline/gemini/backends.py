"""Where a client's requests go: the Gemini Developer API or Gemini on Vertex AI.

One client (client.py) speaks to both; a backend is the small part that differs — the base URL,
the path of a model's method and whether the Files API and Interactions exist. The request and
answer bodies are the same GenerateContentRequest / GenerateContentResponse on both (Vertex
requires `role` on every content, which build_generate_content_body always sends; Vertex reads
`fileData.fileUri = "gs://..."` objects in place, where the Developer API takes Files API URIs).
Auth (an API key, or Vertex's OAuth2 bearer token) is auth.py's.

Vertex batch prediction (`projects/{p}/locations/{l}/batchPredictionJobs`) is vertex_batches.py's,
beside the Developer API's Batch Mode in batches.py (`GeminiClient.batch_predictions`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.gemini.model_info import model_path
from pipeline.gemini.types import DEFAULT_BASE_URL

BackendName = Literal["developer", "vertex"]
BACKENDS: tuple[BackendName, ...] = ("developer", "vertex")
DEVELOPER_BASE_URL = DEFAULT_BASE_URL
GLOBAL_LOCATION = "global"
VERTEX_VERSION = "v1"  # the Vertex REST reference's GA version (the SDK defaults to v1beta1)
VERTEX_PUBLISHER = "publishers/google/models/"


MULTI_REGIONAL_LOCATIONS = ("us", "eu")  # the SDK's _MULTI_REGIONAL_LOCATIONS
# Which quota a Vertex request may use (the "Use Provisioned Throughput" page): "dedicated" only
# Provisioned Throughput (a 429 past it, never pay-as-you-go), "shared" only pay-as-you-go (the
# subscription bypassed); unset, Provisioned Throughput first and the overage on demand. Sent on
# generateContent only (`generate_headers`): the page sets it per online request, to choose the
# quota that serves that model call. A batch prediction job's calls (create, get, list, cancel,
# delete) are no model call — their lines are served by batch prediction at the batch price, not
# from the online quota — and countTokens and models.get consume no throughput.
REQUEST_TYPE_HEADER = "X-Vertex-AI-LLM-Request-Type"
REQUEST_TYPES = ("", "shared", "dedicated")


def vertex_base_url(location: str) -> str:
    """`https://{location}-aiplatform.googleapis.com`, the global endpoint's host, or a
    multi-region's (the SDK's `BaseApiClient.__init__`: `global` ->
    `https://aiplatform.googleapis.com/`; `us` / `eu` -> `https://aiplatform.{loc}.rep.googleapis.com/`)."""
    if location == GLOBAL_LOCATION:
        return "https://aiplatform.googleapis.com"
    if location in MULTI_REGIONAL_LOCATIONS:
        return f"https://aiplatform.{location}.rep.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def project_from_env() -> str | None:
    """GOOGLE_CLOUD_PROJECT, as the SDK's `BaseApiClient.__init__` reads it (None when unset)."""
    return os.environ.get("GOOGLE_CLOUD_PROJECT") or None


def scope_in_env() -> bool:
    """GOOGLE_CLOUD_PROJECT or GOOGLE_CLOUD_LOCATION set: either one makes the SDK's
    `BaseApiClient.__init__` drop an API key from the environment ("The project/location from
    the environment variables will take precedence over the API key")."""
    return bool(os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_LOCATION"))


def location_from_env() -> str:
    """GOOGLE_CLOUD_LOCATION, else "global" (the SDK's `BaseApiClient.__init__`: no location
    and no API key -> 'global')."""
    return os.environ.get("GOOGLE_CLOUD_LOCATION") or GLOBAL_LOCATION


@dataclass(frozen=True, slots=True)
class Developer:
    """The Gemini Developer API: `{base}/{version}/models/{model}:{method}`."""

    base_url: str
    version: str
    name: BackendName = "developer"
    files_api: bool = True  # Files API uploads and Interactions exist here only
    interactions: bool = True

    @property
    def generate_headers(self) -> dict[str, str]:
        """Headers of a generateContent call besides auth: none here."""
        return {}

    def model_url(self, model: str, method: str) -> str:
        return f"{self.base_url}/{self.version}/models/{_model_id(model)}:{method}"

    def model_resource_url(self, model: str) -> str:
        """models.get of `model` (a tuned model's "tunedModels/<id>" kept: `model_path`)."""
        return f"{self.base_url}/{self.version}/{model_path(model)}"

    def count_tokens_body(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """countTokens takes the request inside a `generateContentRequest` naming the model
        (the SDK's `_CountTokensParameters_to_mldev`)."""
        return {"generateContentRequest": {"model": f"models/{_model_id(model)}", **request}}


@dataclass(frozen=True, slots=True)
class Vertex:
    """Gemini on Vertex AI: `{base}/{version}/projects/{p}/locations/{l}/publishers/google/
    models/{model}:{method}` (the SDK's `_build_request` prefixes `projects/.../locations/...`).

    Without a project (express mode: an API key), the path starts at `publishers/`, as the SDK
    builds it when only an API key is set."""

    base_url: str
    project: str | None
    location: str = GLOBAL_LOCATION
    version: str = VERTEX_VERSION
    name: BackendName = "vertex"
    files_api: bool = False
    interactions: bool = False
    request_type: str = ""  # `[api] vertex_request_type`: REQUEST_TYPE_HEADER's value, or none

    @property
    def generate_headers(self) -> dict[str, str]:
        """Headers of a generateContent call besides auth: the request type, when one is asked
        (REQUEST_TYPES; on that call only, REQUEST_TYPE_HEADER says why)."""
        return {REQUEST_TYPE_HEADER: self.request_type} if self.request_type else {}

    def model_url(self, model: str, method: str) -> str:
        return f"{self._scope()}{VERTEX_PUBLISHER}{_model_id(model)}:{method}"

    def model_resource_url(self, model: str) -> str:
        """A publisher model's get: `{base}/{version}/publishers/google/models/{m}`, never under
        a project (the SDK's `_build_request`: "Skip adding project and locations when getting
        Vertex AI base models")."""
        return f"{self.base_url}/{self.version}/{VERTEX_PUBLISHER}{_model_id(model)}"

    def count_tokens_body(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """countTokens takes contents and systemInstruction at the top level (the SDK's
        `_CountTokensParameters_to_vertex`)."""
        return request

    def _scope(self) -> str:
        root = f"{self.base_url}/{self.version}/"
        if self.project is None:
            return root
        return f"{root}projects/{self.project}/locations/{self.location}/"


Backend = Developer | Vertex


def _model_id(model: str) -> str:
    """The bare id: "models/x" and "publishers/google/models/x" both name x. ValueError for an
    id that would change the URL's path or query (as `model_path` refuses it)."""
    model_path(model)  # the same refusal of "..", "?" and "&" as models.get
    return model.removeprefix(VERTEX_PUBLISHER).removeprefix("models/")
