"""Manifests of http(s) URLs against local HTTP servers on loopback: 404, 429 with Retry-After,
a redirect to another host, bodies over the cap, X-Robots-Tag — and the API key never sent."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline.cli import main as cli_main
from pipeline.commands.estimate import estimate
from pipeline.commands.render import render
from pipeline.config import ConfigError, with_overrides
from pipeline.engines import RedoRefused
from pipeline.inputs.checks import require_inputs
from pipeline.inputs.fetch import Fetcher, FetchError, FetchSettings
from pipeline.inputs.guard import address_kind
from pipeline.output.parts import current_rows
from pipeline.records import SourceFile
from tests.conftest import make_config, run, scene_png

KEY = "secret-key-that-must-stay-home"
LOOPBACK = ("127.0.0.1", "127.0.0.2")  # the test sites: allowed by name, as a user would


def png(seed: int) -> bytes:
    return scene_png(seed, size=(80, 80))


class Site:
    """A tiny image host: what each path answers, and every request it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.busy_left = 1
        self.other = ""  # the other host's URL, for the redirect
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get("/img/{n}.png", self.image)
        self.app.router.add_get("/nohead/{n}.png", self.image, allow_head=False)  # HEAD: 405
        self.app.router.add_get("/missing.png", self.missing)
        self.app.router.add_get("/busy.png", self.busy)
        self.app.router.add_get("/moved.png", self.moved)
        self.app.router.add_get("/huge.png", self.huge)
        self.app.router.add_get("/stream.png", self.stream)
        self.app.router.add_get("/noai.png", self.noai)
        self.app.router.add_get("/target.png", self.target)
        self.app.router.add_get("/to-file.png", self.to_file)
        self.app.router.add_get("/to-metadata.png", self.to_metadata)
        self.app.router.add_get("/loop.png", self.loop)
        self.url = ""
        self.local_file = ""  # a file on this machine, a redirect's forbidden target

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.method, request.path, dict(request.headers)))
        return await handler(request)

    async def image(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.Response(body=png(n), content_type="image/png", headers={"ETag": f'"v{n}"'})

    async def missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def busy(self, request: web.Request) -> web.Response:
        if self.busy_left and request.method == "GET":
            self.busy_left -= 1
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(body=png(50), content_type="image/png")

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{self.other}/target.png")

    async def to_file(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"file://{self.local_file}")

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop.png")

    async def to_metadata(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/iam/")

    async def target(self, request: web.Request) -> web.Response:
        return web.Response(body=png(60), content_type="image/png")

    async def huge(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG" + b"0" * 200_000, content_type="image/png")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b"1" * 8192)
        await response.write_eof()
        return response

    async def noai(self, request: web.Request) -> web.Response:
        return web.Response(body=png(70), headers={"X-Robots-Tag": "noindex, noai"})


async def serve(site: Site, host: str) -> web.AppRunner:
    runner = web.AppRunner(site.app)
    await runner.setup()
    tcp = web.TCPSite(runner, host, 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    site.url = f"http://{host}:{port}"
    return runner


@pytest.fixture
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    """Two hosts: 127.0.0.1 and 127.0.0.2 (both loopback), the first redirecting to the second."""
    home, other = Site(), Site()
    runners = [await serve(home, "127.0.0.1"), await serve(other, "127.0.0.2")]
    home.other = other.url
    yield home, other
    for runner in runners:
        await runner.cleanup()


async def test_a_manifest_of_urls_end_to_end(
    tmp_path: Path, sites: tuple[Site, Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, other = sites
    monkeypatch.setenv("GEMINI_API_KEY", KEY)  # in the environment: must go nowhere but Gemini
    paths = [f"/img/{n}.png" for n in range(4)]
    paths += ["/missing.png", "/busy.png", "/moved.png", "/huge.png", "/stream.png", "/noai.png"]
    urls = [home.url + path for path in paths]
    manifest = tmp_path / "urls.txt"
    manifest.write_text("# images on the web\n" + "\n".join(urls + urls[:2]) + "\n")
    config = make_config(
        tmp_path,
        input={
            "paths": [],
            "manifest": str(manifest),
            "max_fetch_mb": 0.1,
            "allow_hosts": list(LOOPBACK),
        },
    )
    summary = await run(config)
    rows = {r["image_path"]: r for r in current_rows(tmp_path / "out").to_pylist()}
    assert set(rows) == set(urls)  # the duplicates listed twice: one row each
    assert all(r["image_root"] == "" for r in rows.values())
    ok = {url for url, r in rows.items() if r["status"] == "ok"}
    assert ok == {urls[n] for n in (0, 1, 2, 3, 5, 6)}  # busy retried, moved followed
    assert rows[urls[4]]["error"] == "HTTP 404 Not Found"
    assert rows[urls[7]]["error"].startswith("input too large: 0.2 MB, the cap of 0.1 MB")
    assert rows[urls[8]]["error"].startswith("input too large: more than the cap")
    assert rows[urls[9]]["error"].startswith("X-Robots-Tag: noai")
    assert rows[urls[0]]["file_size"] == len(png(0)) and rows[urls[0]]["file_mtime_ns"] > 0
    assert summary.api_calls == 6
    # followed to the other host: by the HEAD that asks its version, then by the GET
    assert [(m, p) for m, p, _ in other.seen] == [("HEAD", "/target.png"), ("GET", "/target.png")]
    for _, _, headers in home.seen + other.seen:  # the image session carries no key
        assert KEY not in str(headers) and "x-goog-api-key" not in {h.lower() for h in headers}

    # The same URLs read by the estimate (synchronous, as the CLI calls it: off this loop,
    # which serves the sites), as a first run into an empty output would buy them.
    first_run = with_overrides(config, {"output.dir": str(tmp_path / "empty")})
    guess = await asyncio.to_thread(estimate, first_run)
    assert (guess["images"], guess["unusable_files"]) == (6, 4)
    assert guess["input_tokens"] == summary.tokens["prompt_tokens"]
    gallery = await asyncio.to_thread(
        render, tmp_path / "out", tmp_path / "gallery", allow_hosts=LOOPBACK
    )
    assert (gallery["entries"], gallery["missing_sources"]) == (6, 0)  # each read by its URL
    hosts = [arg for host in LOOPBACK for arg in ("--allow-host", host)]
    out, flagged = str(tmp_path / "out"), str(tmp_path / "gallery-cli")
    assert await asyncio.to_thread(cli_main, ["render", out, "--out", flagged, *hosts]) == 0
    assert _drawn(Path(flagged)) == _drawn(tmp_path / "gallery")  # the images, not placeholders

    before = Counter((m, p) for m, p, _ in home.seen)
    again = await run(config)
    after = Counter((m, p) for m, p, _ in home.seen) - before
    assert again.api_calls == 0 and again.skipped == 10  # done (errors too): a HEAD only
    assert all(after[("GET", path)] == 0 for path in paths[:4])
    assert all(after[("HEAD", path)] == 1 for path in paths[:4])


async def test_a_model_change_over_urls_whose_head_is_refused_is_a_settings_redo(
    tmp_path: Path, sites: tuple[Site, Site]
) -> None:
    """A URL whose HEAD is refused has no size or version until its GET: the plan must ask the
    resume index's verdict after that read, or the rows a model change redoes count as changed
    files, not as settings, and the `[limits] max_redo` guard lets the run buy them all again
    without a question."""
    home, _ = sites
    manifest = tmp_path / "urls.txt"
    manifest.write_text("".join(f"{home.url}/nohead/{n}.png\n" for n in range(3)))
    inputs = {"paths": [], "manifest": str(manifest), "allow_hosts": list(LOOPBACK)}
    assert (await run(make_config(tmp_path, input=inputs))).api_calls == 3
    other = make_config(tmp_path, input=inputs, api={"model": "gemini-2.5-flash-lite"})
    report = await asyncio.to_thread(estimate, other)
    categories = report["plan"]["categories"]
    assert {name: entry["requests"] for name, entry in categories.items() if entry["requests"]} == {
        "settings": 3
    }
    with pytest.raises(RedoRefused):
        await run(other, ask_before_redo=True)


def _drawn(gallery: Path) -> dict[str, bytes]:
    """A gallery's drawn files by name (its page aside: it names its own folder)."""
    return {
        p.name: p.read_bytes() for p in gallery.rglob("*") if p.is_file() and p.suffix != ".html"
    }


class HandTime:
    """A clock that only the fetcher's (recorded) sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


async def test_retry_after_is_honoured_and_capped(sites: tuple[Site, Site]) -> None:
    home, _ = sites
    hand = HandTime()
    waits = hand.waits
    settings = FetchSettings(max_retry_after=0.5, allow_hosts=LOOPBACK)
    with Fetcher(
        FetchSettings(allow_hosts=LOOPBACK), sleep=hand.sleep, clock=hand.clock, seed=1
    ) as fetcher:
        src = SourceFile(path=home.url + "/busy.png", root="", rel_path="x")
        assert (await fetcher.read(src)).startswith(b"\x89PNG")
        assert waits == [1.0] and fetcher.retries == 1
    home.busy_left = 1
    with Fetcher(settings, sleep=hand.sleep, clock=hand.clock) as fetcher:
        src = SourceFile(path=home.url + "/busy.png", root="", rel_path="x")
        with pytest.raises(FetchError, match=r"HTTP 429 Too Many Requests \(Retry-After 1 s"):
            await fetcher.read(src)


async def test_failures_that_do_not_pass_give_up_after_the_attempts(
    sites: tuple[Site, Site],
) -> None:
    home, _ = sites
    hand = HandTime()
    waits = hand.waits
    home.busy_left = 10  # 429 without end
    with Fetcher(
        FetchSettings(attempts=3, allow_hosts=LOOPBACK), sleep=hand.sleep, clock=hand.clock
    ) as fetcher:
        src = SourceFile(path=home.url + "/busy.png", root="", rel_path="x")
        with pytest.raises(FetchError, match=r"HTTP 429 Too Many Requests \(after 3 attempts\)"):
            await fetcher.read(src)
        assert waits == [1.0, 1.0]  # the host's Retry-After before each new attempt, no more
        with pytest.raises(FetchError) as missing:
            await fetcher.read(SourceFile(path=home.url + "/missing.png", root="", rel_path="x"))
        assert not missing.value.retryable  # a 404 is the input's own: kept, not retried
        assert waits == [1.0, 1.0, 1.0]  # the host's last Retry-After holds for every read of it
    with Fetcher(
        FetchSettings(attempts=2, allow_hosts=LOOPBACK), sleep=hand.sleep, clock=hand.clock
    ) as fetcher:
        closed = SourceFile(path="http://127.0.0.1:9/nothing.png", root="", rel_path="x")
        with pytest.raises(FetchError, match=r"fetch failed: .*\(after 2 attempts\)") as down:
            await fetcher.read(closed)
        assert down.value.retryable  # transient: the next plain run tries it again


def test_a_url_given_as_an_input_path_says_to_use_a_manifest(tmp_path: Path) -> None:
    config = make_config(tmp_path, input={"paths": ["https://example.com/photos/a.png"]})
    with pytest.raises(
        ConfigError, match=r"a URL is not a folder to walk; list URLs in a manifest"
    ):
        require_inputs(config)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("fd00::1", "unique-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public address"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_which_addresses_are_internal(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


async def test_internal_addresses_are_refused_after_dns_and_on_every_hop(
    tmp_path: Path, sites: tuple[Site, Site]
) -> None:
    home, other = sites
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(9))
    home.local_file = str(secret)
    port = home.url.rsplit(":", 1)[1]
    urls = [
        home.url + "/img/0.png",  # 127.0.0.1, not allowed
        f"http://localhost:{port}/img/1.png",  # a name: refused once resolved
        f"http://[::ffff:127.0.0.1]:{port}/img/2.png",  # IPv4-mapped IPv6
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
    ]
    manifest = tmp_path / "urls.txt"
    manifest.write_text("\n".join(urls) + "\n")
    config = make_config(tmp_path, input={"paths": [], "manifest": str(manifest)})
    summary = await run(config)
    rows = [r for r in current_rows(tmp_path / "out").to_pylist()]
    errors = {r["image_path"]: r["error"] for r in rows}
    hint = "refused (set [input] allow_hosts to allow)"
    assert len(rows) == len(urls)  # recorded once each, no crash
    assert errors[urls[0]] == f"address 127.0.0.1 is loopback: {hint}"
    assert errors[urls[1]].startswith("host localhost: address ")
    assert errors[urls[1]].endswith(f"is loopback: {hint}")
    assert errors[urls[2]] == f"address ::ffff:127.0.0.1 is loopback: {hint}"
    assert errors[urls[3]] == f"address 169.254.169.254 is link-local: {hint}"
    assert summary.api_calls == 0 and home.seen == [] and other.seen == []  # nothing reached

    # Allowed by name, a host's own redirects are still checked hop by hop.
    allowed = ("127.0.0.1",)
    with Fetcher(FetchSettings(allow_hosts=allowed)) as fetcher:
        ok = SourceFile(path=home.url + "/img/3.png", root="", rel_path="x")
        assert await fetcher.read(ok) == png(3)
        cases = {
            "/moved.png": f"address 127.0.0.2 is loopback: {hint}",  # to the other host
            "/to-metadata.png": f"address 169.254.169.254 is link-local: {hint}",
            "/to-file.png": "redirect to a file:// URL refused (hop 1)",
            "/loop.png": "too many redirects (more than 10)",
        }
        for path, reason in cases.items():
            src = SourceFile(path=home.url + path, root="", rel_path="x")
            with pytest.raises(FetchError) as refused:
                await fetcher.read(src)
            assert str(refused.value) == reason and not refused.value.retryable
    assert other.seen == []  # the redirect to it was refused before a connection
    with Fetcher(FetchSettings(allow_hosts=("localhost",))) as fetcher:  # a name, as resolved
        named = SourceFile(path=f"http://localhost:{port}/img/4.png", root="", rel_path="x")
        assert await fetcher.read(named) == png(4)


@pytest.mark.parametrize(
    ("code", "retryable", "tries"), [(503, True, 3), (429, True, 3), (403, False, 1)]
)
async def test_a_store_error_past_its_own_retries_is_the_objects_fetch_error(
    monkeypatch: pytest.MonkeyPatch, code: int, retryable: bool, tries: int
) -> None:
    """gcsfs raises its HttpError (not an OSError) once its own retries are spent: the object
    is a FetchError (a row naming it), retried first when transient, never a crash of the run."""
    gcs_retry = pytest.importorskip("gcsfs.retry")
    fsspec = pytest.importorskip("fsspec")
    memory = type(fsspec.filesystem("memory"))
    asked: list[str] = []

    def failing(self: Any, path: str, **span: Any) -> bytes:
        asked.append(path)
        raise gcs_retry.HttpError({"code": code, "message": "Backend Error"})

    monkeypatch.setattr(memory, "cat_file", failing)
    hand = HandTime()
    with Fetcher(FetchSettings(attempts=3), sleep=hand.sleep, clock=hand.clock) as fetcher:
        src = SourceFile(path="memory://flaky/a.png", root="memory://flaky", rel_path="a.png")
        with pytest.raises(FetchError, match=f"{code}") as failed:
            await fetcher.read(src)
    assert failed.value.retryable is retryable and len(asked) == tries


async def test_an_objects_403_as_gcsfs_raises_it_is_not_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gcsfs answers a 403 with a bare OSError("Forbidden: <path>..."), not its HttpError: read
    as the refusal it is (stores.http_status), the object's row at once, not retryable."""
    fsspec = pytest.importorskip("fsspec")
    memory = type(fsspec.filesystem("memory"))
    asked: list[str] = []

    def forbidden(self: Any, path: str, **span: Any) -> bytes:
        asked.append(path)
        raise OSError(f"Forbidden: {path}\nno storage.objects.get access")

    monkeypatch.setattr(memory, "cat_file", forbidden)
    with Fetcher(FetchSettings(attempts=3)) as fetcher:
        src = SourceFile(path="memory://shut/a.png", root="memory://shut", rel_path="a.png")
        with pytest.raises(FetchError, match="Forbidden") as failed:
            await fetcher.read(src)
    assert failed.value.retryable is False and len(asked) == 1


# A 400's message, which gcsfs turns into a ValueError (not its HttpError)
GCS_400 = {
    "invalid": "Invalid argument: the object name is invalid",  # "Bad Request: <path>"
    "requester pays": "Bucket is a requester pays bucket but no user project provided.",
}


@pytest.mark.parametrize("answer", list(GCS_400))
async def test_an_objects_400_as_gcsfs_raises_it_is_its_row_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """gcsfs turns a 400 whose message says "invalid" into ValueError("Bad Request: ...") and
    one of a requester-pays bucket into ValueError("Bucket is requester pays...") from its
    HttpError: the store's refusal of that object, its row at once (not retryable) — not an
    exception that ends the run."""
    fsspec = pytest.importorskip("fsspec")
    gcs_retry = pytest.importorskip("gcsfs.retry")
    memory = type(fsspec.filesystem("memory"))
    asked: list[str] = []
    body = json.dumps({"error": {"code": 400, "message": GCS_400[answer]}}).encode()

    @gcs_retry.retry_request
    async def get(path: str) -> None:  # as gcsfs's _call sends a request and reads its answer
        gcs_retry.validate_response(400, body, path)

    def refused(self: Any, path: str, **span: Any) -> bytes:
        asked.append(path)
        asyncio.run(get(path))
        raise AssertionError("a 400 answered")

    monkeypatch.setattr(memory, "cat_file", refused)
    with Fetcher(FetchSettings(attempts=3)) as fetcher:
        src = SourceFile(path="memory://paid/a.png", root="memory://paid", rel_path="a.png")
        with pytest.raises(FetchError, match="object read failed: B") as failed:
            await fetcher.read(src)
    assert failed.value.retryable is False and len(asked) == 1
