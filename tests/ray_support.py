"""What the tests of the Ray engine on a local cluster share (tests/test_ray*.py): the cluster
(the `cluster` fixture of tests/conftest.py starts it through `start_cluster`, once a pytest
process), a config made a Ray run's, rows compared without what differs between runs, and a
driver in a child process to kill or signal.

The cluster listens on the loopback only (the switch below is read when Ray is imported) and
gets more logical CPUs than the machine has, so four one-CPU workers fit on a 2-core CI box.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

# The test modules take `ray` (and NAMESPACE) from here: imported after this switch.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import Config
from pipeline.engines.ray.quota import NAMESPACE
from pipeline.localserver.server import LocalServer
from tests.conftest import REPO, child_env

# What may differ between two runs of the same images: when, by which run, how fast.
RUN_COLUMNS = {"run_id", "completed_at", "latency_ms"}
ANSWER = ("key", "image_sha256", "status", "objects", "raw_response", "width", "height")


@contextlib.contextmanager
def start_cluster(node_credentials: Path, node_storage: socket.socket) -> Iterator[str]:
    """A local Ray cluster whose driver is this process (so in-process runs use it; subprocess
    drivers join it with --address): its address. Its workers inherit this process's
    environment as it is now (the AWS variables of the local S3, as a node's would point at
    its store), and, as a node's own (set for the cluster alone: this process's runs keep
    theirs), find Application Default Credentials at `node_credentials` and Cloud Storage at
    the loopback port `node_storage` is bound to (a local server given that socket serves it)."""
    storage = f"http://127.0.0.1:{node_storage.getsockname()[1]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(node_credentials))
        env.setenv("STORAGE_EMULATOR_HOST", storage)
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            namespace=NAMESPACE,
            logging_level="WARNING",
            log_to_driver=False,
        )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def on_ray(config: Config, **engine: Any) -> Config:
    """`config` run by the Ray engine (`engine`: its other [engine] settings)."""
    return replace(config, engine=replace(config.engine, kind="ray", **engine))


def by_path(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per image (a second is a duplicate), without what differs between runs (the
    service's responseId is a fresh random id per answer)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["image_path"] not in out, f"two rows for {row['image_path']}"
        if row["raw_response"]:
            answer = json.loads(row["raw_response"])
            answer.pop("responseId", None)
            row["raw_response"] = answer
        out[row["image_path"]] = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
    return out


def durable(out: Path) -> int:
    """Rows answered so far: in parts, or in a journal (read while the run writes)."""
    total = 0
    for path in out.glob("data/part-*.parquet"):
        with contextlib.suppress(OSError, ValueError):
            total += pq.read_metadata(path).num_rows
    for path in out.glob(".journal-*"):
        with contextlib.suppress(OSError):
            total += path.read_bytes().count(b"\n")
    return total


async def start_driver(config: Path) -> asyncio.subprocess.Process:
    """`pipeline run CONFIG` in a child process: the driver of a run on the cluster."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pipeline", "run", str(config), "--quiet"),
        env=child_env(),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def unlocked(out: Path) -> bool:
    """Nobody holds the output (every writer of the killed run is gone)."""
    fd = os.open(out / ".sink.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def worker_pid() -> int:
    """The process of the first worker (by name) of the run on the cluster."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    name = sorted(n for n in names if n.startswith("worker-"))[0]
    return (await ray.get_actor(name, namespace=NAMESPACE).info.remote())["pid"]


def write_config(tmp_path: Path, base_url: str, address: str, **limits: Any) -> Path:
    """A user's config file of a 4-worker detect run on the cluster at `address`."""
    path = tmp_path / "ray.toml"
    extra = "".join(f"{key} = {value}\n" for key, value in limits.items())
    path.write_text(
        f"""
[api]
base_url = "{base_url}"
[limits]
concurrency = 2
{extra}
[input]
paths = ["{tmp_path / "images"}"]
[task]
kind = "detect"
[output]
dir = "{tmp_path / "out"}"
flush_seconds = 0.5
[engine]
kind = "ray"
address = "{address}"
workers = 4
"""
    )
    return path


def sent(server: LocalServer) -> int:
    """generateContent requests the server has received, answered or not yet (a request inside
    its latency when a process is killed is in flight: the kill may cost it)."""
    received = server.stats()["requests_received"]
    return sum(count for path, count in received.items() if "generate" in path)
