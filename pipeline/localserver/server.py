"""The server: one aiohttp application wiring the API surfaces over the shared core.

Surfaces, each a module with a class that registers its routes under every API version:
batches.py (Batch Mode, reusing generate.parse_request and generate.response_body for each of
its requests), generate.py (generateContent, countTokens), interactions.py, files_api.py,
cached_contents.py (explicit context caches), models_api.py (models.get, models.list),
vertex.py (the same generateContent on Vertex AI's paths, its bearer tokens and their /token
endpoint, gs:// objects read in place), storage.py (a read-only Cloud Storage JSON API over the
same buckets, for gcsfs).
GET /local/stats reads the counters.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pipeline.localserver import transport
from pipeline.localserver.batches import BatchesSurface
from pipeline.localserver.cached_contents import CachedContentsSurface
from pipeline.localserver.core import API_VERSIONS, Core
from pipeline.localserver.files_api import FilesSurface
from pipeline.localserver.generate import GenerateSurface
from pipeline.localserver.interactions import InteractionsSurface
from pipeline.localserver.models_api import ModelsSurface
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.storage import StorageSurface
from pipeline.localserver.vertex import VertexSurface
from pipeline.models import ModelTable, default_table

# Batch Mode first: its `...:batchGenerateContent` and `files/{id}:download` routes would
# otherwise be taken by generate.py's `models/{model_action}` and files_api.py's `files/{id}`.
SURFACES = (
    BatchesSurface,
    GenerateSurface,
    InteractionsSurface,
    FilesSurface,
    CachedContentsSurface,
    ModelsSurface,
    VertexSurface,
    StorageSurface,
)
SHUTDOWN_GRACE_SECONDS = 2.0


def build_app(core: Core) -> tuple[web.Application, list[Any]]:
    """The application and its surfaces (whose counters join /local/stats)."""
    app = web.Application(
        middlewares=[transport.middleware(core.stats)],
        client_max_size=core.options.inline_limit_bytes + 1,
    )
    surfaces = [surface(core) for surface in SURFACES]
    version = "{version:" + "|".join(API_VERSIONS) + "}"
    for surface in surfaces:
        surface.routes(app, version)
    return app, surfaces


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: any free port), ready to listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class LocalServer:
    """The local Gemini-compatible server, started in the running event loop.

    `async with LocalServer(ServerOptions(...)) as server:` then point a client at
    `server.base_url`. `clock` (seconds since the epoch) drives quota windows and the files'
    lifecycle, so tests can move time instead of sleeping. `models` is the model table it
    serves (the bundled one by default; a run passes its own, with its config's `[models]`).
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sock: socket.socket | None = None,
        models: ModelTable | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self._sock = sock  # a listening socket shared by several worker processes
        self._core = Core(self.options, clock or time.time, models or default_table())
        self._app, self._surfaces = build_app(self._core)
        self._app.router.add_get(transport.STATS_PATH, self._stats_route)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        await runner.setup()
        try:
            sock = self._sock or bind_socket(self.options.host, self.options.port)
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"

    async def close(self) -> None:
        if self._runner is None:
            return
        self._core.answerer.closing.set()  # hung requests give up now
        for surface in self._surfaces:
            getattr(surface, "close", lambda: None)()  # background work (batch jobs) stops
        runner, self._runner = self._runner, None
        await runner.cleanup()
        self._core.answer_log.close()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """The counters GET /local/stats returns."""
        snapshot = self._core.snapshot()
        for surface in self._surfaces:
            snapshot.update(getattr(surface, "snapshot", dict)())
        return snapshot

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def __repr__(self) -> str:
        return f"LocalServer({self.base_url or 'not started'})"
