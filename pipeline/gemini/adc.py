"""Application Default Credentials through google-auth: the optional `[vertex]` extra, imported
only by a run on the Vertex backend.

`google.auth.default` finds, in its order: GOOGLE_APPLICATION_CREDENTIALS (a service-account key
file, or an external-account / workload-identity-federation config), the gcloud user
credentials (`gcloud auth application-default login`), then the metadata server (GCE, GKE
workload identity, Cloud Run). Scoped to cloud-platform, as the SDK's `load_auth` asks. The
token it hands out is fetched by `Credentials.refresh` (blocking HTTP: auth.TokenAuth runs it in a
thread) from the credential's own token endpoint — for a key file, its `token_uri`.
"""

from __future__ import annotations

from datetime import UTC, datetime

import google.auth
import google.auth.transport.requests

from pipeline.gemini.auth import TokenFetch

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# A credential that states no expiry (some external accounts): assume Google's usual hour.
DEFAULT_LIFETIME = 3600.0


def application_default() -> tuple[TokenFetch, str | None]:
    """(a blocking fetch of a fresh access token, the project the credentials name or None).

    google-auth's DefaultCredentialsError (no credentials found) propagates: its message says
    where it looked, and holds no secret."""
    credentials, project = google.auth.default(scopes=list(SCOPES))
    request = google.auth.transport.requests.Request()

    def fetch() -> tuple[str, float]:
        credentials.refresh(request)
        return str(credentials.token or ""), _lifetime(credentials.expiry)

    return fetch, project


def _lifetime(expiry: datetime | None) -> float:
    """Seconds until `expiry` (google-auth's naive UTC datetime)."""
    if expiry is None:
        return DEFAULT_LIFETIME
    now = datetime.now(UTC).replace(tzinfo=None)
    return (expiry - now).total_seconds()
