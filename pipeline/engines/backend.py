"""Which backend a run's client speaks to, and how it proves who it is (`[api] backend`).

The Developer API takes the key from the environment. Vertex AI follows the SDK's
`BaseApiClient.__init__` precedence for a key from the environment (the only key this pipeline
takes): a project or a location, set (`[api] project`, `[api] location`) or in the environment
(GOOGLE_CLOUD_PROJECT, GOOGLE_CLOUD_LOCATION), takes precedence over it, and means Application
Default Credentials (google-auth, the optional `[vertex]` extra, imported only here and only
then), with the project the credentials name when none is set; only an API key with neither
means Vertex express mode (the key in `x-goog-api-key`, paths without a project).
`[api] base_url` left at its default becomes the location's Vertex endpoint; set (or "local"),
it is used as it is, as the SDK's `http_options.base_url` is. Vertex requests use its GA
version, v1 (`[api] version` names the Developer API's).
"""

from __future__ import annotations

import logging

from pipeline.config import Config, ConfigError
from pipeline.gemini.auth import Auth, KeyAuth, TokenAuth, TokenFetch
from pipeline.gemini.backends import (
    DEVELOPER_BASE_URL,
    Backend,
    Developer,
    Vertex,
    location_from_env,
    project_from_env,
    scope_in_env,
    vertex_base_url,
)

log = logging.getLogger(__name__)

VERTEX_EXTRA = "pip install 'gemini-vision-pipeline[vertex]'"


def client_backend(
    config: Config, base_url: str, key: str, version: str
) -> tuple[Backend, Auth | None]:
    """The backend and its auth (None: the API key `key`, as the client has always taken it)."""
    api = config.api
    if api.backend != "vertex":
        return Developer(base_url.rstrip("/"), version), None
    location = api.location or location_from_env()
    if base_url.rstrip("/") == DEVELOPER_BASE_URL:  # the default: the location's endpoint
        base_url = vertex_base_url(location)
    project = api.project or project_from_env()
    if api.base_url == "local" or _express(config, key):
        # express mode, the key alone (the SDK's order); the bundled server, started for this
        # run with no service account, takes its key on every Vertex path
        return _vertex(config, base_url, project, location), KeyAuth(key)
    fetch, adc_project = _application_default(config)
    project = project or adc_project
    if project is None:
        raise ConfigError(
            f"{config.source}: [api] project: not set, GOOGLE_CLOUD_PROJECT is not set and the "
            'credentials name none: set [api] project = "my-project"'
        )
    return _vertex(config, base_url, project, location), TokenAuth(fetch)


def _vertex(config: Config, base_url: str, project: str | None, location: str) -> Vertex:
    request_type = config.api.vertex_request_type
    return Vertex(base_url.rstrip("/"), project, location, request_type=request_type)


def _express(config: Config, key: str) -> bool:
    """An API key, and no project or location set or in the environment (the SDK's
    `BaseApiClient.__init__`: either one takes precedence over a key from the environment)."""
    scoped = bool(config.api.project or config.api.location) or scope_in_env()
    if key and scoped:
        log.info(
            "Vertex AI: the project/location take precedence over the API key from the "
            "environment (as in the google-genai SDK): Application Default Credentials are used"
        )
    return bool(key) and not scoped


def _application_default(config: Config) -> tuple[TokenFetch, str | None]:
    """google-auth's ADC; ConfigError when the extra is missing or no credentials are found."""
    try:
        # Imported here: google-auth is the optional [vertex] extra, needed by Vertex runs only.
        from pipeline.gemini import adc
    except ImportError:
        raise ConfigError(
            f'{config.source}: [api] backend = "vertex" needs google-auth: {VERTEX_EXTRA}'
        ) from None
    try:
        return adc.application_default()
    except Exception as exc:  # DefaultCredentialsError, a malformed key file: no secret in it
        failure = ConfigError(
            f'{config.source}: [api] backend = "vertex": no usable Application Default '
            f"Credentials ({type(exc).__name__}: {exc}); set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service-account key file, or run `gcloud auth application-default login`"
        )
    raise failure
