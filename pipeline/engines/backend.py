"""Which backend a run's client speaks to, and how it proves who it is (`[api] backend`).

The Developer API takes the key from the environment. Vertex AI follows the SDK's
`BaseApiClient.__init__` precedence: a project (`[api] project`, else GOOGLE_CLOUD_PROJECT)
means Application Default Credentials (google-auth, the optional `[vertex]` extra, imported
only here and only then); no project but an API key in the environment means Vertex express
mode (the key in `x-goog-api-key`, paths without a project); neither means ADC, with the project
the credentials name. `[api] base_url` left at its default becomes the location's Vertex
endpoint; set (or "local"), it is used as it is, as the SDK's `http_options.base_url` is.
Vertex requests use its GA version, v1 (`[api] version` names the Developer API's).
"""

from __future__ import annotations

from pipeline.config import Config, ConfigError
from pipeline.gemini.auth import Auth, KeyAuth, TokenAuth, TokenFetch
from pipeline.gemini.backends import (
    DEVELOPER_BASE_URL,
    Backend,
    Developer,
    Vertex,
    location_from_env,
    project_from_env,
    vertex_base_url,
)

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
    if api.base_url == "local" or (project is None and key):
        # express mode, the key alone (the SDK's order); the bundled server, started for this
        # run with no service account, takes its key on every Vertex path
        return Vertex(base_url.rstrip("/"), project, location), KeyAuth(key)
    fetch, adc_project = _application_default(config)
    project = project or adc_project
    if project is None:
        raise ConfigError(
            f"{config.source}: [api] project: not set, GOOGLE_CLOUD_PROJECT is not set and the "
            'credentials name none: set [api] project = "my-project"'
        )
    return Vertex(base_url.rstrip("/"), project, location), TokenAuth(fetch)


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
