"""The Ray engine on a local cluster, killed and signalled: a kill -9 of a worker, of the driver,
of the quota actor repays only what was in flight; SIGTERM drains the fleet (tests/test_ray.py
says where the cluster comes from)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import draw_shapes, make_config, read_rows, run, until
from tests.ray_support import (
    NAMESPACE,
    durable,
    on_ray,
    ray,
    sent,
    start_driver,
    unlocked,
    worker_pid,
    write_config,
)


async def test_kill_9_of_a_worker_and_of_the_driver_repays_only_what_was_in_flight(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from pipeline.config import load_config

    monkeypatch.setenv("GEMINI_API_KEY", "kill-test-key")
    n = 160
    for i in range(n):  # every file its own size: no twin, no copy
        Image.new("RGB", (24 + i % 40, 24 + i // 40), (i, 90, 7)).save(images_dir / f"k{i:03d}.png")
    out = tmp_path / "out"
    async with LocalServer(ServerOptions(latency_ms=300, seed=3)) as server:
        config = write_config(tmp_path, server.base_url, cluster)
        driver = await start_driver(config)
        await until(lambda: durable(out) >= 20)
        os.kill(await worker_pid(), signal.SIGKILL)  # Ray restarts it; its blocks are retried
        # Sent but not durable when it died: the most a kill may cost (other workers' included).
        exposed = sent(server) - durable(out)
        await until(lambda: durable(out) >= 70)
        driver.kill()  # SIGKILL: its workers die with it, as soon as Ray sees it gone
        await driver.wait()
        await until(lambda: unlocked(out))
        exposed += sent(server) - durable(out)
        assert 70 <= durable(out) < n
        summary = await run(load_config(config))
        paid = sent(server)
    assert summary.exit_code == exits.OK, summary
    counts = Counter(row["image_path"] for row in read_rows(out))
    assert sorted(counts) == [f"k{i:03d}.png" for i in range(n)]
    assert set(counts.values()) == {1}, "a row was written twice"
    assert n <= paid <= n + exposed, (paid, exposed)


async def test_sigterm_drains_the_fleet_and_says_how_to_resume(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from pipeline.config import load_config

    monkeypatch.setenv("GEMINI_API_KEY", "signal-test-key")
    n = 120
    for i in range(n):
        Image.new("RGB", (24 + i % 40, 24 + i // 40), (i, 9, 70)).save(images_dir / f"t{i:03d}.png")
    out = tmp_path / "out"
    async with LocalServer(ServerOptions(latency_ms=300, seed=4)) as server:
        config = write_config(tmp_path, server.base_url, cluster)
        driver = await start_driver(config)
        await until(lambda: durable(out) >= 20)
        driver.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(driver.communicate(), 60)
        assert driver.returncode == exits.STOPPED, stderr.decode()
        assert b"resume" in stderr
        done = read_rows(out)
        assert 20 <= len(done) < n
        summary = json.loads(next((out / ".runs").glob("*.json")).read_text())
        assert summary["stop_reason"] == "interrupted"
        assert sum(summary["rows"].values()) == len(done)  # all that finished was committed
        again = await run(load_config(config))
    assert again.exit_code == exits.OK
    counts = Counter(row["image_path"] for row in read_rows(out))
    assert len(counts) == n and set(counts.values()) == {1}


async def test_a_lost_quota_actor_is_restarted_and_the_run_goes_on(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.engines.ray.quota import quota_name

    monkeypatch.setenv("GEMINI_API_KEY", "lost-quota-key")
    for i in range(60):
        draw_shapes(64 + i, 64, seed=500 + i, count=1)[0].save(images_dir / f"l{i:02d}.png")
    async with LocalServer(ServerOptions(latency_ms=100, seed=5)) as server:
        config = make_config(
            tmp_path,
            api={"base_url": server.base_url},
            limits={"rpm": 6000, "rpd": 1000, "concurrency": 2},
            task={"kind": "detect"},
        )
        running = asyncio.ensure_future(run(on_ray(config, workers=2)))
        out = tmp_path / "out"
        await until(lambda: durable(out) >= 10)
        name = quota_name("lost-quota-key", "gemini-2.5-flash")
        actor = ray.get_actor(name, namespace=NAMESPACE)
        before = (await actor.status.remote())["incarnation"]
        ray.kill(actor, no_restart=False)  # as a lost node would: Ray restarts it
        summary = await running
        after = await ray.get_actor(name, namespace=NAMESPACE).status.remote()
    assert summary.exit_code == exits.OK, summary
    assert sum(summary.rows.values()) == 60
    assert after["incarnation"] != before
    assert after["seeded"]  # the driver told the new actor the day's count
