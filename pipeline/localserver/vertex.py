"""Gemini on Vertex AI, over the same core and answering as the Developer API surface.

Routes (`{version}` is v1 or v1beta1, the SDK's default with `vertexai=True`):

- `POST /{version}/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent`
  and `:countTokens` — a bearer token this server issued and that has not expired on its clock;
  401 UNAUTHENTICATED otherwise, 403 PERMISSION_DENIED for a token of another project;
- `POST /{version}/publishers/google/models/{model}:generateContent` — express mode, the API key
  (`x-goog-api-key`, as the SDK sends it) checked as the Developer API's is; a key is taken on
  the project paths too (Vertex API keys bound to a service account are), so a run against the
  bundled server (`base_url = "local"`, no service account) needs no token endpoint;
- `GET /{version}/publishers/google/models/{model}` — the publisher model (models.get);
- `POST /token` — the OAuth2 JWT-bearer grant (RFC 7523) a service-account key file's
  `token_uri` may point at: the assertion's RS256 signature verified against the public key of
  the `--service-account` key file, its `iss`, `aud` (this endpoint, or Google's, which
  google-auth always names) and `exp` checked, and a token that lives
  `--token-seconds` returned as `{"access_token", "expires_in", "token_type"}`.

Bodies are the Developer API's (generate.py reads them); a `fileData.fileUri = "gs://..."` is read
by the server itself from the folder `--gs-root bucket=DIR` maps the bucket to (the double
cannot import the pipeline's object-store layer: it sits below it), as Vertex reads Cloud
Storage with its service agent. Answers carry `usageMetadata.trafficType`: PROVISIONED_THROUGHPUT
for a request that asks `X-Vertex-AI-LLM-Request-Type: dedicated`, else ON_DEMAND; a quota of
`--rpm` / `--tpm` / `--rpd` run out answers Vertex's bare 429 RESOURCE_EXHAUSTED (no QuotaFailure,
no RetryInfo), as its dynamic shared quota does. `/local/stats` counts tokens issued and
refused, gs reads, and the request types asked.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pipeline.gemini.backends import REQUEST_TYPE_HEADER
from pipeline.localserver import errors, model_checks
from pipeline.localserver.core import Core
from pipeline.localserver.generate import GenerateSurface
from pipeline.localserver.image_input import ImageReader
from pipeline.localserver.vertex_batches import VertexBatchesSurface

VERSIONS = {"v1": "v1", "v1beta1": "v1beta"}  # Vertex's version -> the model table's
PUBLISHER = "publishers/google/models"
TOKEN_PATH = "/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_ASSERTION_SECONDS = 3600  # Google refuses an assertion that lives longer (RFC 7523 §3)
# google-auth signs every service-account assertion for Google's own token endpoint, whatever
# the key file's token_uri (`service_account._GOOGLE_OAUTH2_TOKEN_ENDPOINT`, google-auth 2.63)
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
# The request type a caller may ask for, and the trafficType of its answers: the double plays a
# project whose Provisioned Throughput serves what is asked of it ("dedicated"); everything
# else is pay-as-you-go (its quotas, run out, answer Vertex's bare 429).
ON_DEMAND = "ON_DEMAND"
TRAFFIC_TYPES = {"dedicated": "PROVISIONED_THROUGHPUT", "shared": ON_DEMAND}
QUOTA_RULE = "quota.exceeded"


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The account /token trusts: its email (the JWT's `iss`), project and public key."""

    email: str
    project: str | None
    public_key: Any  # cryptography's RSAPublicKey

    @classmethod
    def from_key_file(cls, path: str) -> ServiceAccount:
        # Imported here: cryptography (the [vertex] and test extras) verifies signatures only
        # for a server given --service-account.
        from cryptography.hazmat.primitives import serialization

        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        private = serialization.load_pem_private_key(info["private_key"].encode(), None)
        return cls(info["client_email"], info.get("project_id"), private.public_key())

    def signed(self, signing_input: bytes, signature: bytes) -> bool:
        # cryptography imported only when a signature is checked, as in `from_key_file`
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            self.public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Grant:
    expires: float  # on the server's clock
    project: str | None


class GrantRefused(Exception):
    """An assertion /token does not accept; the text is the OAuth2 error_description."""


class TokenIssuer:
    """Issues and checks bearer tokens; counts them."""

    def __init__(self, core: Core) -> None:
        self.core = core
        path = core.options.service_account
        self.account = ServiceAccount.from_key_file(path) if path else None
        self._grants: dict[str, Grant] = {}
        self._order: dict[str, int] = {}  # token -> its place in `uses`
        self.uses: list[Counter[str]] = []  # per token issued, in order: the calls it made
        self.issued = 0
        self.grants_refused = 0  # assertions /token turned down
        self.tokens_refused = 0  # bearer tokens unknown or expired when used

    def grant(self, assertion: str, audience: str) -> dict[str, Any]:
        """The token answer for a valid assertion; GrantRefused otherwise."""
        account = self.account
        if account is None:
            raise GrantRefused("no service account is registered (--service-account)")
        claims = _verified(account, assertion)
        _check_claims(account, claims, audience, self.core.clock())
        token = "ya29.local-" + secrets.token_urlsafe(32)
        lifetime = self.core.options.token_seconds
        self._grants[token] = Grant(self.core.clock() + lifetime, account.project)
        self._order[token] = len(self.uses)
        self.uses.append(Counter())
        self.issued += 1
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    def valid(self, token: str, use: str) -> Grant | None:
        """The token's grant if it is live, its `use` (the call it made) counted; else None."""
        grant = self._grants.get(token)
        if grant is None or grant.expires <= self.core.clock():
            self.tokens_refused += 1
            return None
        self.uses[self._order[token]][use] += 1
        return grant


def _verified(account: ServiceAccount, assertion: str) -> dict[str, Any]:
    """The claims of an RS256 JWT `account` signed; GrantRefused otherwise."""
    try:
        head, body, signature = assertion.split(".")
        header, claims = _b64json(head), _b64json(body)
        raw_signature = _b64(signature)
    except (ValueError, binascii.Error):
        raise GrantRefused("Invalid JWT: malformed") from None
    if header.get("alg") != "RS256":
        raise GrantRefused("Invalid JWT: only RS256 is accepted")
    if not account.signed(f"{head}.{body}".encode(), raw_signature):
        raise GrantRefused("Invalid JWT Signature.")
    return claims


def _check_claims(
    account: ServiceAccount, claims: dict[str, Any], audience: str, now: float
) -> None:
    """Issued by `account`, for this endpoint (or Google's), short-lived and not yet expired."""
    if claims.get("iss") != account.email:
        raise GrantRefused("Invalid JWT: iss is not the registered service account")
    if claims.get("aud") not in (audience, GOOGLE_TOKEN_AUDIENCE):
        raise GrantRefused("Invalid JWT: aud is not this token endpoint")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise GrantRefused("Invalid JWT: exp and iat are required")
    if exp <= now or exp - iat > MAX_ASSERTION_SECONDS:
        raise GrantRefused(
            "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe."
        )


class VertexSurface:
    """The Vertex AI routes (see the module docstring)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tokens = TokenIssuer(core)
        self.images = ImageReader(core.files, dict(core.options.gs_root))
        self.generate = GenerateSurface(core)
        self.request_types: Counter[str] = Counter()  # X-Vertex-AI-LLM-Request-Type values
        # batch prediction: its own jobs, this surface's auth, its input read as Vertex reads
        self.batches = VertexBatchesSurface(core, self._let_in, self.images)

    def routes(self, app: web.Application, _developer_versions: str) -> None:
        version = "{version:" + "|".join(VERSIONS) + "}"
        scoped = f"/{version}/projects/{{project}}/locations/{{location}}/{PUBLISHER}"
        app.router.add_post(TOKEN_PATH, self.token)
        app.router.add_post(f"{scoped}/{{model_action}}", self.scoped_method)
        app.router.add_post(f"/{version}/{PUBLISHER}/{{model_action}}", self.express_method)
        app.router.add_get(f"/{version}/{PUBLISHER}/{{model}}", self.get_model)
        self.batches.add_routes(app, version)

    def close(self) -> None:
        self.batches.close()

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        audience = str(request.url.with_query(None))
        try:
            if form.get("grant_type") != JWT_BEARER:
                raise GrantRefused(f"grant_type must be {JWT_BEARER}")
            answer = self.tokens.grant(str(form.get("assertion", "")), audience)
        except GrantRefused as exc:
            self.tokens.grants_refused += 1
            refusal = {"error": "invalid_grant", "error_description": str(exc)}
            return web.json_response(refusal, status=400)
        return web.json_response(answer)

    async def scoped_method(self, request: web.Request) -> web.Response:
        self._let_in(request, request.match_info["project"])
        return await self._serve(request)

    async def express_method(self, request: web.Request) -> web.Response:
        self._let_in(request, None)
        return await self._serve(request)

    async def get_model(self, request: web.Request) -> web.Response:
        self._let_in(request, None)
        version = VERSIONS[request.match_info["version"]]
        resource = self._models_resource(request.match_info["model"], version)
        return web.json_response(resource)

    def snapshot(self) -> dict[str, Any]:
        tokens = self.tokens
        return {
            "vertex": {
                "tokens_issued": tokens.issued,
                "grants_refused": tokens.grants_refused,
                "tokens_refused": tokens.tokens_refused,
                # which calls each token issued made (no token in it): who shared a token
                "token_uses": [dict(uses) for uses in tokens.uses],
                "gs_reads": self.images.gs_reads,
                "request_types": dict(self.request_types),
            },
            **self.batches.snapshot(),
        }

    def _let_in(self, request: web.Request, project: str | None) -> None:
        """A live bearer token (of `project`, when the path names one), or an API key."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            grant = self.tokens.valid(header.removeprefix("Bearer "), _use(request))
            if grant is None:
                raise errors.unauthenticated()
            if project is not None and grant.project not in (None, project):
                raise errors.vertex_permission_denied(project)
            return
        if request.headers.get("x-goog-api-key"):
            self.core.check_key(request)
            return
        raise errors.unauthenticated()

    async def _serve(self, request: web.Request) -> web.Response:
        """The Developer API's answer, with Vertex's trafficType, and Vertex's 429 for a quota
        this server's simulation runs out of."""
        version = VERSIONS[request.match_info["version"]]
        action = request.match_info["model_action"]
        asked = request.headers.get(REQUEST_TYPE_HEADER, "")
        self.request_types[asked or "unset"] += 1
        traffic = TRAFFIC_TYPES.get(asked, ON_DEMAND)
        try:
            return await self.generate.serve(
                request, version, action, self.images, vertex=True, traffic_type=traffic
            )
        except errors.ApiError as exc:
            if exc.rule != QUOTA_RULE:
                raise
            raise errors.vertex_resource_exhausted(exc) from None

    def _models_resource(self, model_id: str, version: str) -> dict[str, Any]:
        """A PublisherModel: its name and launch stage (no token limits: Vertex's resource has
        none); the 404 of an unknown model, as generate.py answers it."""
        model_checks.known_model(
            model_id, version, "generateContent", table=self.core.models, on=self.core.today()
        )
        return {"name": f"{PUBLISHER}/{model_id}", "versionId": "001", "launchStage": "GA"}


def _use(request: web.Request) -> str:
    """What a call does, for `token_uses`: its method ("generateContent"), else its HTTP verb."""
    action = request.match_info.get("model_action", "")
    return action.rpartition(":")[2] if ":" in action else request.method


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64json(text: str) -> dict[str, Any]:
    value = json.loads(_b64(text))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
