"""The Ray engine on Vertex AI with Application Default Credentials: each worker gets its own
bearer token on its node (the local cluster's nodes find a key file at `node_credentials`, as a
node's service account would be found), no credential crosses Ray, the fleet shares the
project's quota in its location, and the rows are the single engine's.

The local server's Vertex surface issues the tokens (its /token checks the key file's signed
assertion) and says which calls each token it issued made (`token_uses`): a token the driver
shipped to its workers would be one used both by the driver's models.get and by their calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gcsfs
import pytest
import ray
from PIL import Image
from ray._private.serialization import SerializationContext
from ray.cloudpickle import dumps

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.engines.ray.quota import NAMESPACE, vertex_quota_name
from pipeline.engines.ray.worker import WorkerSetup
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output import stores
from tests.conftest import make_config, read_rows, run, save_scenes, until
from tests.ray_support import by_path, durable, on_ray, sent, worker_pid
from tests.test_vertex import PROJECT, TOKEN_PREFIX, point_token_uri, write_key_file

MODEL = "gemini-2.5-flash"


@pytest.fixture
def node_key(node_credentials: Path) -> Iterator[Path]:
    """The nodes' service-account key file (its token_uri set once the server runs); gone
    afterwards, so the cluster's other tests find no credentials."""
    write_key_file(node_credentials, "http://127.0.0.1:1/token")
    yield node_credentials
    node_credentials.unlink(missing_ok=True)


@pytest.fixture
def server_options(node_key: Path) -> ServerOptions:
    # tokens live an hour: each process fetches one, so whose token served a call is told
    return ServerOptions(api_key="test-key", service_account=str(node_key), token_seconds=3600)


@pytest.fixture
def adc(server: LocalServer, node_key: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The key file pointed at the server, for the nodes and for this process (the driver)."""
    point_token_uri(node_key, server)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(node_key))
    for name in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    return node_key


@pytest.fixture
def serialized(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Everything this process (the driver) hands Ray to serialize: task and actor arguments,
    objects put in the store (Ray's own serializer, recorded on its way in)."""
    seen: list[Any] = []
    serialize = SerializationContext.serialize

    def recorded(self: SerializationContext, value: Any) -> Any:
        seen.append(value)
        return serialize(self, value)

    monkeypatch.setattr(SerializationContext, "serialize", recorded)
    return seen


def vertex(server: LocalServer, location: str, **sections: Any) -> dict[str, Any]:
    api = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    return {"api": {**api, "location": location}, **sections}


def quota_status(location: str) -> dict[str, Any]:
    name = vertex_quota_name(PROJECT, location, MODEL)
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).status.remote())


def pickled(values: list[Any]) -> bytes:
    """The values as Ray's pickler writes them (an object it cannot pickle here: its repr)."""
    out = []
    for value in values:
        try:
            out.append(dumps(value))
        except Exception:
            out.append(repr(value).encode())
    return b"\n".join(out)


def ray_logs() -> bytes:
    """What the cluster's processes wrote to their log files (workers' stdout and stderr)."""
    folder = Path(ray._private.worker._global_node.get_logs_dir_path())
    return b"".join(path.read_bytes() for path in folder.glob("*") if path.is_file())


async def test_a_ray_run_on_vertex_gives_the_single_engines_rows_with_its_own_tokens(
    cluster: Any,
    server: LocalServer,
    adc: Path,
    images_dir: Path,
    tmp_path: Path,
    serialized: list[Any],
) -> None:
    save_scenes(images_dir, 8, prefix="scene", seed=310)
    sections = vertex(server, "us-central1", task={"kind": "detect"})
    sections["api"]["vertex_request_type"] = "dedicated"
    single = await run(make_config(tmp_path, **sections, output={"dir": str(tmp_path / "one")}))
    config = on_ray(make_config(tmp_path, **sections), workers=2)
    spread = await run(config)

    assert spread.exit_code == single.exit_code == exits.OK
    for name in ("rows", "api_calls", "tokens", "cost_usd"):
        assert getattr(spread, name) == getattr(single, name), name
    one, many = by_path(read_rows(tmp_path / "one")), by_path(read_rows(tmp_path / "out"))
    assert sorted(many) == sorted(one) and len(one) == 8
    for path, row in one.items():  # keys, answers, tokens, traffic types: all but the run's
        assert many[path] == row, path
    assert {row["traffic_type"] for row in many.values()} == {"PROVISIONED_THROUGHPUT"}
    stats = server.stats()["vertex"]
    assert stats["request_types"] == {"dedicated": 16}

    # The single run: one token for its models.get and calls. The Ray run: the driver's for
    # its models.get only, and one each worker fetched on its node for its calls.
    single_token, *fleet = stats["token_uses"]
    assert single_token == {"GET": 1, "generateContent": 8}
    assert [uses for uses in fleet if "GET" in uses] == [{"GET": 1}]  # the driver's
    workers = [uses for uses in fleet if "GET" not in uses]
    assert len(workers) == 2 and all(set(uses) == {"generateContent"} for uses in workers)
    assert sum(uses["generateContent"] for uses in workers) == 8
    # nothing the driver gave Ray holds a token; the workers' setup went through it
    assert any(isinstance(value, WorkerSetup) and value.adc for value in serialized)
    assert not any(isinstance(value, WorkerSetup) and value.key for value in serialized)
    assert TOKEN_PREFIX.encode() not in pickled(serialized)
    assert TOKEN_PREFIX.encode() not in ray_logs()
    kept = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(TOKEN_PREFIX.encode() in data for data in kept)
    # the fleet's quota is the project's in its location, per model: no key names it
    assert quota_status("us-central1")["seeded"]

    again = await run(config)  # resume: everything is done, nothing bought
    assert (again.api_calls, again.skipped, again.exit_code) == (0, 8, exits.OK)


async def test_a_429_storm_slows_the_fleet_and_the_run_completes(
    cluster: Any, adc: Path, images_dir: Path, tmp_path: Path
) -> None:
    """Vertex's bare 429 (its dynamic shared quota) is a per-minute signal: the fleet's quota
    slows down and the run goes on; it never stops for a day's quota."""
    # two requests a second (the window shortened so that a storm passes in seconds); tokens
    # that live 200 s, under the refresh margin: each worker refreshes its own for every call
    options = ServerOptions(
        service_account=str(adc), rpm=2, quota_window_seconds=1.0, token_seconds=200
    )
    async with LocalServer(options) as stormy:
        point_token_uri(adc, stormy)
        save_scenes(images_dir, 8, prefix="storm", seed=320)
        limits = {"concurrency": 2, "max_attempts": 10}
        config = make_config(tmp_path, **vertex(stormy, "europe-west4", limits=limits))
        summary = await run(on_ray(config, workers=2))
        refused, tokens = stormy.stats()["requests"], stormy.stats()["vertex"]

    assert summary.exit_code == exits.OK and summary.rows == {"ok": 8}
    assert summary.throttled > 0
    assert refused[f"POST {_scoped('europe-west4')}:generateContent"] == {
        "200": 8,
        "429": summary.throttled,
    }
    assert tokens["tokens_refused"] == 0  # every call found its worker's token fresh
    assert tokens["tokens_issued"] > summary.api_calls // 2  # refreshed on the workers
    status = quota_status("europe-west4")  # the fleet's one quota slowed down
    assert status["throttled"] > 0
    assert status["effective_rpm"] is not None  # no rate configured: the storm's, adopted


async def test_a_worker_killed_mid_run_comes_back_with_a_token_of_its_own(
    cluster: Any, adc: Path, images_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of a worker: Ray restarts it, the new one fetches its own token on its node,
    commits its predecessor's journal and goes on; what is paid twice is only what was in
    flight, and every image has one row."""
    n = 32
    for i in range(n):  # every file its own size: no twin, no copy
        Image.new("RGB", (24 + i, 24), (i, 90, 7)).save(images_dir / f"k{i:02d}.png")
    options = ServerOptions(service_account=str(adc), latency_ms=300, seed=3)
    out = tmp_path / "out"
    async with LocalServer(options) as slow:
        point_token_uri(adc, slow)
        config = make_config(tmp_path, **vertex(slow, "us-west1", limits={"concurrency": 2}))
        running = asyncio.ensure_future(run(on_ray(config, workers=2)))
        await until(lambda: durable(out) >= 6, exited=lambda: running.done() or None)
        os.kill(await worker_pid(), signal.SIGKILL)
        exposed = sent(slow) - durable(out)  # sent, not durable: the most the kill may cost
        summary = await running
        paid, issued = sent(slow), slow.stats()["vertex"]["tokens_issued"]

    assert summary.exit_code == exits.OK and sum(summary.rows.values()) == n
    counts = Counter(row["image_path"] for row in read_rows(out))
    assert len(counts) == n and set(counts.values()) == {1}
    assert n <= paid <= n + exposed, (paid, exposed)
    assert issued == 4  # the driver's, the two workers', and the restarted worker's own


@pytest.fixture
def gcs() -> Iterator[None]:
    """gs:// through gcsfs to the local server `node_storage` serves; this process's cached
    gs filesystem (holding that address) forgotten afterwards."""
    yield
    stores.filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


async def test_workers_send_gs_objects_in_place_as_the_single_engine_does(
    cluster: Any,
    node_storage: socket.socket,
    adc: Path,
    tmp_path: Path,
    gcs: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker reads each object's header (a range), never the object, and sends it as a
    fileData part the service reads from the bucket (`sent_as_stored`, in the runner). The
    server listens on `node_storage`, the nodes' storage address (one test a session may)."""
    bucket = tmp_path / "bucket-photos"
    (bucket / "day1").mkdir(parents=True)
    save_scenes(bucket / "day1", 4, prefix="scene", seed=340, size=(400, 300))
    options = ServerOptions(service_account=str(adc), gs_root=(f"photos={bucket}",))
    async with LocalServer(options, sock=node_storage) as served:
        point_token_uri(adc, served)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", served.base_url)  # the driver's walk
        inputs = {"paths": ["gs://photos/day1"]}
        config = make_config(tmp_path, **vertex(served, "us-east4", input=inputs))
        summary = await run(on_ray(config, workers=2))
        stats = served.stats()

    assert summary.rows == {"ok": 4}
    assert {row["input_mode"] for row in read_rows(tmp_path / "out")} == {"in_place"}
    assert stats["storage"]["object_gets"] == 0  # headers only: a range each
    assert stats["storage"]["range_gets"] == 4 and stats["vertex"]["gs_reads"] == 4


@pytest.mark.parametrize("credentials", ["missing", "another account's key"])
async def test_a_worker_without_credentials_stops_the_run_at_its_start(
    cluster: Any,
    server: LocalServer,
    adc: Path,
    node_credentials: Path,
    images_dir: Path,
    tmp_path: Path,
    credentials: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver has credentials; the nodes have none, or a key the token endpoint refuses.
    The run stops before any file is handed out, naming the node and the cause, with no
    token; a rerun once the nodes have them buys every image (once: one case is enough)."""
    save_scenes(images_dir, 4, prefix="bare", seed=330)
    driver_key = tmp_path / "driver-sa.json"
    driver_key.write_bytes(adc.read_bytes())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(driver_key))
    if credentials == "missing":
        node_credentials.unlink()
    else:
        point_token_uri(write_key_file(node_credentials, ""), server)
    config = on_ray(make_config(tmp_path, **vertex(server, "asia-east1")), workers=1)
    with pytest.raises(ConfigError) as stopped:
        await run(config)

    message = str(stopped.value)
    assert "a worker on the Ray node at" in message
    why = "DefaultCredentialsError" if credentials == "missing" else "Invalid JWT Signature"
    assert why in message and TOKEN_PREFIX not in message
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and TOKEN_PREFIX not in out + err
    assert f"POST {_scoped('asia-east1')}:generateContent" not in server.stats()["requests"]
    assert read_rows(tmp_path / "out") == []

    if credentials != "missing":
        return
    node_credentials.write_bytes(driver_key.read_bytes())  # the nodes get the key: resume
    summary = await run(config)
    assert (summary.exit_code, summary.rows, summary.api_calls) == (exits.OK, {"ok": 4}, 4)


def _scoped(location: str) -> str:
    return f"/v1/projects/{PROJECT}/locations/{location}/publishers/google/models/{MODEL}"
