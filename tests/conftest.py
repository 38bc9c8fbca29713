"""Shared helpers of the tests: shape images with exact truth, configs, runs, rows and outputs,
a hand clock, polling; and the shared fixtures (the local server, an HTTP session, S3 on
loopback, an output on disk and on S3)."""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import faulthandler
import hashlib
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pyarrow.dataset as ds
import pytest
from _pytest.assertion import rewrite as pytest_rewrite
from aiohttp import web
from PIL import Image, ImageDraw

from pipeline.config import Config, parse_config
from pipeline.engines import RunOptions, run_async
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer, bind_socket
from pipeline.masks import rle_encode
from pipeline.output.sink import ParquetSink
from pipeline.output.stores import Store, open_store
from pipeline.records import make_key
from pipeline.run.summary import RunSummary

# gcsfs (2026.10) reads this once, when first imported, and without it asks a gRPC storage-
# control API for each bucket: any test may import gcsfs first (`gcsfs.retry`), and the storage
# double serves the JSON API only (tests/test_vertex.py's gcs_double sets it too, too late then)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
REPO = Path(__file__).resolve().parent.parent
COLORS = [(220, 40, 40), (40, 170, 70), (40, 80, 220), (235, 200, 40), (140, 60, 170)]


@dataclass
class Shape:
    kind: str  # rectangle | circle
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in displayed pixels
    mask: np.ndarray  # bool HxW of the displayed image


def draw_shapes(
    width: int, height: int, seed: int, count: int = 3
) -> tuple[Image.Image, list[Shape]]:
    """Non-overlapping rectangles and circles on a white background, with their exact masks."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    shapes: list[Shape] = []
    tries = 0
    while len(shapes) < count and tries < 200:
        tries += 1
        w, h = rng.randint(width // 7, width // 3), rng.randint(height // 7, height // 3)
        x0, y0 = rng.randint(5, width - w - 5), rng.randint(5, height - h - 5)
        box = (x0, y0, x0 + w, y0 + h)
        if any(
            not (
                box[2] + 8 <= s.box[0]
                or s.box[2] + 8 <= box[0]
                or box[3] + 8 <= s.box[1]
                or s.box[3] + 8 <= box[1]
            )
            for s in shapes
        ):
            continue
        kind = rng.choice(["rectangle", "circle"])
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        shape_xy = (x0, y0, x0 + w - 1, y0 + h - 1)
        (draw.rectangle if kind == "rectangle" else draw.ellipse)(shape_xy, fill=255)
        image.paste(COLORS[len(shapes) % len(COLORS)], mask=layer)
        shapes.append(Shape(kind, box, np.asarray(layer) > 127))
    return image, shapes


def scene_png(seed: int, size: tuple[int, int] = (96, 96)) -> bytes:
    """The PNG bytes of a scene of two shapes drawn from `seed`."""
    buffer = io.BytesIO()
    draw_shapes(*size, seed=seed, count=2)[0].save(buffer, "PNG")
    return buffer.getvalue()


def save_scenes(
    folder: Path, count: int, *, prefix: str, seed: int, size: tuple[int, int] = (96, 80)
) -> list[Path]:
    """`count` PNGs of two shapes each, PREFIX000.png on, drawn from seeds `seed` on."""
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:03d}.png"
        draw_shapes(*size, seed=seed + i, count=2)[0].save(path)
        paths.append(path)
    return paths


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config like a user's file: local server, the given sections merged over defaults."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": "local", "model": "gemini-2.5-flash", "timeout": 20},
        "limits": {"concurrency": 4, "max_attempts": 4},
        "input": {"paths": [str(tmp_path / "images")]},
        "task": {"kind": "segment"},
        "output": {"dir": str(tmp_path / "out"), "flush_seconds": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "test-config.toml", tmp_path)


def read_rows(output_dir: Path) -> list[dict[str, Any]]:
    """Every row a plain reader sees, in no particular order: an output's `data/` folder (or
    any folder of parts given, e.g. `.superseded`)."""
    folder = Path(output_dir) / "data" if (Path(output_dir) / "data").is_dir() else output_dir
    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not files:
        return []
    return ds.dataset(files, format="parquet").to_table().to_pylist()


def newest_by_path(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest row (by completed_at) per image path, as readers see it."""
    newest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["completed_at"]):
        newest[row["image_path"]] = row
    return newest


def read_current(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The newest committed row per image path of an output folder."""
    return newest_by_path(read_rows(output_dir))


async def run(config: Config, **options: Any) -> RunSummary:
    """A run in this event loop, quiet and with seeded backoff; `options` are RunOptions'."""
    return await run_async(config, RunOptions(**{"progress": False, "seed": 0, **options}))


def result_row(
    path: str,
    *,
    content: str | None = None,
    settings: str = "s1",
    root: str = "/data",
    task: str = "detect",
    status: str = "ok",
    **columns: Any,
) -> dict[str, Any]:
    """A row as a run commits it, for image `path` under `root`: keyed by the sha256 of `content`
    (of the path when None) under the `settings` hash, with the other `columns` as given."""
    digest = hashlib.sha256((path if content is None else content).encode()).hexdigest()
    return {
        "key": make_key(digest, settings),
        "image_path": path,
        "image_root": root,
        "image_sha256": digest,
        "task": task,
        "status": status,
        **columns,
    }


def result_object(
    label: str, box: Iterable[float], mask: np.ndarray | None = None
) -> dict[str, Any]:
    """An object as rows hold it: `box` in pixels, the mask (if any) as RLE, and a box_2d of the
    whole image (readers use the pixel box)."""
    return {
        "label": label,
        "box_2d": [0, 0, 1000, 1000],
        "bbox": [float(v) for v in box],
        "mask": rle_encode(mask) if mask is not None else None,
    }


async def write_rows(
    output: str | Path | Store,
    run_id: str,
    rows: Iterable[dict[str, Any]],
    *,
    settle: bool = True,
    **sink: Any,
) -> None:
    """Commit `rows` through a ParquetSink of run `run_id` (`sink`: its other options).
    `settle=False` leaves the rows they supersede where they are, as a killed run (or a release
    before superseding existed) left them."""
    writer = await ParquetSink(output, run_id, **sink).__aenter__()
    try:
        for row in rows:
            await writer.add(row)
    finally:
        await writer.close(settle=settle)


# ------------------------------------------------------------------ processes, time and waiting
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process running this checkout, as it is now (the S3 fixture
    sets the AWS variables)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


START = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: a minute boundary and midnight Pacific


class Clock:
    """A clock tests move by hand: quota windows and file lifecycles without sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    exited: Callable[[], Any] | None = None,
) -> None:
    """Poll `predicate` until true; the timeout only bounds a failing test. With `exited` (None
    while the run being watched goes on, as a child's returncode), that run must not end first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if exited is not None:
            assert exited() is None, "the run ended before the condition held"
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(interval)


T = TypeVar("T")


async def bounded(work: Awaitable[T], what: str, seconds: float = 300.0) -> T:
    """`work`'s result; the test fails naming `what` when it has not finished in `seconds`. A
    run or `pipeline batch wait` follows its jobs until they end, with no bound of its own (a
    job may run a day): a test bounds it rather than hang the suite. The stacks of every task
    and thread go to stderr first (a hang inside a thread, as a store call's, shows there), and
    `work` is cancelled without waiting for it (what ignores a cancel would hang the wait)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        for each in asyncio.all_tasks():
            each.print_stack(file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        task.cancel()
        pytest.fail(f"{what}: not finished after {seconds:g} s (stacks on stderr)", pytrace=False)
    return task.result()


# A folder made unwritable for real (`unwritable`), and the OS error each way says.
UNWRITABLE = [
    ("full", "No space left on device"),
    ("read-only", "Read-only file system"),
    ("no permission", "Permission denied"),
]


def unwritable(folder: Path, how: str, request: pytest.FixtureRequest) -> Callable[[], None]:
    """`folder` made unwritable for real, and the mend: its mode (`no permission`; not for root,
    whom no mode stops), or a tmpfs in its place (the `tiny_disk` fixture of
    tests/test_store_failures.py, which the calling module imports), filled (`full`) or
    remounted read-only (`read-only`)."""
    if how == "no permission":
        if os.geteuid() == 0:
            pytest.skip("root writes into a folder of any mode")
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    disk = request.getfixturevalue("tiny_disk")
    shutil.rmtree(folder)
    folder.symlink_to(disk)
    if how == "read-only":
        remount(disk, "ro")
        return lambda: remount(disk, "rw")
    filler = disk / "filler"
    with contextlib.suppress(OSError):  # (it fills the disk to its last page, or past it)
        filler.write_bytes(bytes(256 * 1024))
    return filler.unlink


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def pytest_configure(config: pytest.Config) -> None:
    """Compile the checkout's pipeline/, scripts/ and tests/ helpers once, before xdist starts
    its workers (not in a worker: `workerinput` names one), as an installed package comes.

    Under PYTHONDONTWRITEBYTECODE (set on CI and agent machines) nothing else writes bytecode
    for an editable checkout, so every child the suite starts (`python -m pipeline`, the
    benchmark and baseline scripts, each Ray worker) compiled the package from source: ~0.45 s
    of CPU each, ~20 % of test_cli.py's and test_tune.py's CPU (41.0 -> 32.6 s). Reading the
    bytecode is not affected by the variable, so the children run what they would anyway."""
    if not hasattr(config, "workerinput"):
        for tree in ("pipeline", "scripts", "tests"):
            compileall.compile_dir(str(REPO / tree), quiet=1)
        _rewrite_ahead(config)


def _rewrite_ahead(config: pytest.Config) -> None:
    """Write pytest's assert-rewritten bytecode of the test modules once, for the workers.

    A worker reads that cache whatever PYTHONDONTWRITEBYTECODE says, but under it never writes
    it, so each of the four rewrote all 91 modules (~6 s of CPU each: half of a worker's
    collection). pytest has no public call for this: its own steps are taken (the module
    loader's `exec_module`), and where pytest has changed them the workers rewrite as before;
    what they read is checked against the source's hash either way."""
    try:
        for path in sorted((REPO / "tests").glob("*.py")):
            if path.name == "conftest.py" or path.name.startswith("test_"):
                _rewrite_once(config, path)
    except (AttributeError, KeyError, TypeError, ValueError):
        return  # --assert=plain (no state), or another pytest: the workers rewrite


def _rewrite_once(config: pytest.Config, path: Path) -> None:
    """The rewritten bytecode of test module `path`, where pytest's loader looks for it."""
    state = config.stash[pytest_rewrite.assertstate_key]
    pyc = pytest_rewrite.get_cache_dir(path) / (path.name[:-3] + pytest_rewrite.PYC_TAIL)
    if pytest_rewrite._read_pyc(path, pyc) is None and pytest_rewrite.try_makedirs(pyc.parent):
        source_hash, code = pytest_rewrite._rewrite_test(path, config)
        pytest_rewrite._write_pyc(state, code, source_hash, pyc)


@pytest.fixture(autouse=True)
def _spill_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket output's local spill files (journal.spill_dir) in a folder of each test's own,
    for it and its children: not the user's cache, where a bucket name reused by another
    session's S3 server would find them."""
    monkeypatch.setenv("GVP_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


# ------------------------------------------------------------------ a real S3 on loopback
@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """moto's S3 server on loopback, one for the whole session (starting it costs ~1 s), with
    the standard AWS environment pointing at it, as a user's would point at their endpoint."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def put_images(prefix: str, count: int, *, start: int = 0) -> list[str]:
    """`count` PNG scenes uploaded under `prefix` (an s3:// URL); their relative names."""
    from pipeline.output.stores import filesystem

    fs = filesystem("s3")
    names = []
    for n in range(start, start + count):
        name = f"batch{n % 3}/img{n:03d}.png"
        fs.pipe(f"{prefix}/{name}", scene_png(n))
        names.append(name)
    return sorted(names)


_BUCKETS = iter(range(1_000_000))


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the session's S3 server: `s3://<name>`."""
    from pipeline.output.stores import filesystem

    name = f"test-bucket-{next(_BUCKETS)}"
    filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["disk", "s3"])
def out(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An output's place, once a local folder and once a prefix of a bucket on the local S3."""
    if request.param == "disk":
        return str(tmp_path / "out")
    return request.getfixturevalue("bucket") + "/out"


@pytest.fixture
def store(out: str) -> Store:
    """The Store of `out` (on disk, then on S3)."""
    return open_store(out)


# ------------------------------------------------------------------ a local Ray cluster
@pytest.fixture(scope="session")
def node_credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the nodes of `cluster` look for Application Default Credentials (a key file, as a
    node's service account would be found): absent unless a test writes one there."""
    return tmp_path_factory.mktemp("node-adc") / "sa.json"


@pytest.fixture(scope="session")
def node_storage() -> Iterator[socket.socket]:
    """A loopback socket whose port the nodes of `cluster` take for Cloud Storage's
    (STORAGE_EMULATOR_HOST): the one test that hands it to a LocalServer serves them gs://."""
    sock = bind_socket("127.0.0.1", 0)
    yield sock
    sock.close()


@pytest.fixture(scope="session")
def cluster(s3_endpoint: str, node_credentials: Path, node_storage: socket.socket) -> Any:
    """A local Ray cluster (tests/ray_support.py), one per pytest process: a start costs
    seconds, and the tests of the Ray engine are spread over several files (tests/test_ray*.py)
    so that xdist's workers run them side by side. No test stops it or changes it for the
    others: a run's workers are the run's own, and a test that counts calls against a quota
    (an actor per API key) sets a key of its own. Started after the local S3, so its workers
    inherit the AWS environment pointing at it."""
    from tests.ray_support import start_cluster  # Ray is imported only where it is used

    with start_cluster(node_credentials, node_storage) as address:
        yield address


# ------------------------------------------------------------------ the local Gemini server
@pytest.fixture
def server_options() -> ServerOptions:
    """The options of `server`; a test module overrides this fixture to start another server."""
    return ServerOptions()


@pytest.fixture
def server_clock() -> Callable[[], float] | None:
    """The clock of `server`: real time, unless a module overrides this with a hand clock."""
    return None


@pytest.fixture
async def server(
    server_options: ServerOptions, server_clock: Callable[[], float] | None
) -> AsyncIterator[LocalServer]:
    """The local Gemini-compatible server in the test's event loop, on a free loopback port."""
    async with LocalServer(server_options, clock=server_clock) as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    """A hand clock at START."""
    return Clock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def answering(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    """An endpoint on a free loopback port whose every request `handler` answers: its URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()
