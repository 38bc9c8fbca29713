"""The Ray engine on a local Ray cluster, one for every test here (a start costs seconds).

The cluster listens on the loopback only (the switch below is read when Ray is imported) and
gets more logical CPUs than the machine has, so four one-CPU workers fit on a 2-core CI box.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import ray

from pipeline import exits
from pipeline.engines.ray.quota import NAMESPACE
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.parts import current_rows
from pipeline.output.stores import LEASE_NAME, open_store
from tests.conftest import (
    REPO,
    child_env,
    draw_shapes,
    make_config,
    put_images,
    read_rows,
    run,
    until,
)

# What may differ between two runs of the same images: when, by which run, how fast.
RUN_COLUMNS = {"run_id", "completed_at", "latency_ms"}
ANSWER = ("key", "image_sha256", "status", "objects", "raw_response", "width", "height")


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Any:
    """A local Ray cluster for this module; this process is its driver (so in-process runs use
    it), and subprocess drivers join it with --address. Started after the local S3, so that its
    workers inherit the AWS environment pointing at it, as a node's would point at its store."""
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace=NAMESPACE,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ray(config: Any, **engine: Any) -> Any:
    from dataclasses import replace

    return replace(config, engine=replace(config.engine, kind="ray", **engine))


def _by_path(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
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


async def test_four_workers_give_the_rows_of_one_process(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    for i in range(40):
        draw_shapes(160, 160, seed=900 + i, count=2)[0].save(images_dir / f"s{i:02d}.png")
    twin = (images_dir / "s00.png").read_bytes()
    (images_dir / "twin-a.png").write_bytes(twin)  # same bytes: one call, two rows
    (images_dir / "twin-b.png").write_bytes(twin)
    (images_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    single_config = make_config(tmp_path, output={"dir": str(tmp_path / "single")})
    single = await run(single_config)
    ray_config = _ray(make_config(tmp_path, output={"dir": str(tmp_path / "ray")}), workers=4)
    spread = await run(ray_config)

    assert (spread.exit_code, single.exit_code) == (exits.ROWS_NOT_OK, exits.ROWS_NOT_OK)
    for name in ("seen", "skipped", "rows", "api_calls", "copied", "tokens", "retries"):
        assert getattr(spread, name) == getattr(single, name), name
    one, many = _by_path(read_rows(tmp_path / "single")), _by_path(read_rows(tmp_path / "ray"))
    assert sorted(one) == sorted(many)
    twins = {"s00.png", "twin-a.png", "twin-b.png"}  # which twin paid is a race in both
    for path in sorted(set(one) - twins):
        assert many[path] == one[path], path
    assert sum(many[p]["attempts"] for p in twins) == sum(one[p]["attempts"] for p in twins) == 1
    for path in twins:  # the same answer (and key) at every path of the same bytes
        assert {k: many[path][k] for k in ANSWER} == {k: one["s00.png"][k] for k in ANSWER}
    # the parts are the workers': one writer's name each, the run's id in every row
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "ray").glob("data/part-*.parquet")}
    assert names <= {f"part-{spread.run_id}.w{i}" for i in range(4)}
    assert {r["run_id"] for r in read_rows(tmp_path / "ray")} == {spread.run_id}
    again = await run(ray_config)  # resume: everything is done
    assert (again.api_calls, again.skipped, again.exit_code) == (0, 43, exits.OK)


async def test_workers_read_a_bucket_and_write_another(
    cluster: Any, tmp_path: Path, bucket: str
) -> None:
    """What a cluster without a shared folder uses: inputs and output in buckets. Each worker
    writes its own parts under the driver's lease; a rerun reads everything from the bucket."""
    inputs, out = f"{bucket}/images", f"{bucket}/dataset"
    names = put_images(inputs, 12)
    config = _ray(make_config(tmp_path, input={"paths": [inputs]}, output={"dir": out}), workers=2)
    first = await run(config)
    assert (first.exit_code, first.api_calls, first.rows) == (exits.OK, 12, {"ok": 12})
    store = open_store(out)
    parts = {e.name.rsplit("-", 1)[0] for e in store.list("data/part-")}
    assert parts and parts <= {f"data/part-{first.run_id}.w{i}" for i in range(2)}
    assert store.info(LEASE_NAME) is None  # released at the end
    rows = current_rows(out, ["image_path", "status"]).to_pylist()
    assert rows == [{"image_path": name, "status": "ok"} for name in names]
    again = await run(config)
    assert (again.exit_code, again.api_calls, again.skipped) == (exits.OK, 0, 12)


async def test_groups_spread_over_workers_give_the_rows_of_one_process(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    """A group is one unit of work for a worker as for the single engine: one request, one row
    with its members, the same answer."""
    for g in range(6):
        folder = images_dir / f"view{g}"
        folder.mkdir()
        for i in range(2 + g % 2):
            draw_shapes(96, 96, seed=40 * g + i, count=1)[0].save(folder / f"{i}.png")
    grouped = {"group_by": "folder"}
    single = await run(make_config(tmp_path, input=grouped, output={"dir": str(tmp_path / "one")}))
    config = make_config(tmp_path, input=grouped, output={"dir": str(tmp_path / "many")})
    spread = await run(_ray(config, workers=2))
    assert (spread.api_calls, spread.rows) == (single.api_calls, single.rows) == (6, {"ok": 6})
    one, many = _by_path(read_rows(tmp_path / "one")), _by_path(read_rows(tmp_path / "many"))
    assert sorted(many) == [f"view{g}" for g in range(6)]
    for name in one:
        assert many[name] == one[name], name
    again = await run(_ray(config, workers=2))
    assert (again.api_calls, again.skipped) == (0, 6)


def _durable(out: Path) -> int:
    """Rows answered so far: in parts, or in a journal (read while the run writes)."""
    import pyarrow.parquet as pq

    total = 0
    for path in out.glob("data/part-*.parquet"):
        with contextlib.suppress(OSError, ValueError):
            total += pq.read_metadata(path).num_rows
    for path in out.glob(".journal-*"):
        with contextlib.suppress(OSError):
            total += path.read_bytes().count(b"\n")
    return total


async def _driver(config: Path) -> asyncio.subprocess.Process:
    """`pipeline run CONFIG` in a child process: the driver of a run on the cluster."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pipeline", "run", str(config), "--quiet"),
        env=child_env(),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def _unlocked(out: Path) -> bool:
    """Nobody holds the output (every writer of the killed run is gone)."""
    fd = os.open(out / ".sink.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def _worker_pid() -> int:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    name = sorted(n for n in names if n.startswith("worker-"))[0]
    return (await ray.get_actor(name, namespace=NAMESPACE).info.remote())["pid"]


def _write_config(tmp_path: Path, base_url: str, address: str, **limits: Any) -> Path:
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
        config = _write_config(tmp_path, server.base_url, cluster)
        driver = await _driver(config)
        await until(lambda: _durable(out) >= 20)
        os.kill(await _worker_pid(), signal.SIGKILL)  # Ray restarts it; its blocks are retried
        # Sent but not durable when it died: the most a kill may cost (other workers' included).
        exposed = _sent(server) - _durable(out)
        await until(lambda: _durable(out) >= 70)
        driver.kill()  # SIGKILL: its workers die with it, as soon as Ray sees it gone
        await driver.wait()
        await until(lambda: _unlocked(out))
        exposed += _sent(server) - _durable(out)
        assert 70 <= _durable(out) < n
        summary = await run(load_config(config))
        paid = _sent(server)
    assert summary.exit_code == exits.OK, summary
    counts = Counter(row["image_path"] for row in read_rows(out))
    assert sorted(counts) == [f"k{i:03d}.png" for i in range(n)]
    assert set(counts.values()) == {1}, "a row was written twice"
    assert n <= paid <= n + exposed, (paid, exposed)


def _sent(server: LocalServer) -> int:
    """generateContent requests the server has received, answered or not yet (a request inside
    its latency when a process is killed is in flight: the kill may cost it)."""
    received = server.stats()["requests_received"]
    return sum(count for path, count in received.items() if "generate" in path)


async def test_four_workers_share_one_quota_to_the_limit_without_429s(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's property (>= 97 % of an enforced RPM in full windows, <= 0.5 % 429s) in
    seconds: the server's "minute" is `window` seconds, the configured limits scaled to match.

    The pacing's headroom (1.5 %) is what absorbs sends made late by a busy machine, and it
    shrinks with the window: 150 ms of a 10 s window (a 3 s window left 45 ms, less than a
    loaded 2-core box's event loops sometimes lag, and a send pushed into the next window can
    meet a 429 there)."""
    from PIL import Image

    window, per_window = 10.0, 300  # 30 requests/s: 1,800 per (real) minute
    monkeypatch.setenv("GEMINI_API_KEY", "quota-test-key")
    n = 960  # 32 s of requests: two whole windows, wherever the run starts
    for i in range(n):
        Image.new("RGB", (8 + i % 50, 8 + i // 50), (i % 256, 40, 90)).save(
            images_dir / f"q{i}.png"
        )
    options = ServerOptions(rpm=per_window, quota_window_seconds=window)
    async with LocalServer(options) as server:
        config = make_config(
            tmp_path,
            api={"base_url": server.base_url},
            limits={
                "rpm": int(per_window * 60 / window),
                "burst_seconds": window / 60,  # a second of a 60-second minute, scaled
                "concurrency": 8,
            },
            task={"kind": "detect"},
        )
        summary = await run(_ray(config, workers=4))
        refused = server.stats()["responses_by_status"].get("429", 0)
    assert summary.exit_code == exits.OK, summary
    rows = read_rows(tmp_path / "out")
    assert len(rows) == n
    sent = np.sort([r["completed_at"].timestamp() - r["latency_ms"] / 1000 for r in rows])
    windows = Counter((sent // window).astype(int).tolist())
    full = [windows[w] for w in range(min(windows) + 1, max(windows))]
    assert len(full) >= 2, windows
    assert min(full) >= 0.97 * per_window, full
    assert max(full) <= per_window, full
    assert refused <= 0.005 * (n + refused), refused


async def test_the_daily_limit_holds_across_workers_and_runs(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers share rpd = 3: never more in the day, and none of it lost. (A worker told
    the day is spent may stop the fleet while another still holds an unused slot: that slot goes
    back to the quota, and the next run of the day uses it.)"""
    monkeypatch.setenv("GEMINI_API_KEY", "daily-test-key")  # its own quota actor
    for i in range(8):
        draw_shapes(96 + i, 96, seed=300 + i, count=1)[0].save(images_dir / f"d{i}.png")
    config = _ray(make_config(tmp_path, limits={"rpd": 3, "concurrency": 2}), workers=2)
    calls = []
    for _ in range(3):
        summary = await run(config)
        assert summary.exit_code == exits.STOPPED
        assert "midnight Pacific" in summary.resume_hint
        calls.append(summary.api_calls)
    assert sum(calls) == 3 and calls[-1] == 0, calls
    assert len(read_rows(tmp_path / "out")) == 3


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
        running = asyncio.ensure_future(run(_ray(config, workers=2)))
        out = tmp_path / "out"
        await until(lambda: _durable(out) >= 10)
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


async def test_the_driver_makes_the_one_preflight_and_none_when_nothing_is_left(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.get once, from the driver (not per worker); a wrong model stops the fleet before
    any generateContent; a rerun with nothing to do calls nothing."""
    monkeypatch.setenv("GEMINI_API_KEY", "preflight-test-key")
    for i in range(6):
        draw_shapes(64, 64, seed=700 + i, count=1)[0].save(images_dir / f"p{i}.png")
    async with LocalServer() as server:
        wrong = make_config(tmp_path, api={"base_url": server.base_url, "model": "gemini-2.5-flsh"})
        refused = await run(_ray(wrong, workers=2))
        assert refused.exit_code == exits.USAGE and "did you mean gemini-2.5-flash" in str(
            refused.stop_reason
        )
        assert server.stats()["requests"] == {"GET /v1beta/models/gemini-2.5-flsh": {"404": 1}}
        config = _ray(make_config(tmp_path, api={"base_url": server.base_url}), workers=2)
        first = await run(config)
        assert (first.exit_code, first.api_calls) == (exits.OK, 6), first
        assert server.stats()["requests"]["GET /v1beta/models/gemini-2.5-flash"] == {"200": 1}
        before = server.stats()["requests_total"]
        again = await run(config)
        assert (again.api_calls, again.skipped) == (0, 6)
        assert server.stats()["requests_total"] == before


async def test_an_alias_the_service_resolves_elsewhere_restarts_the_fleet_under_it(
    cluster: str, images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's preflight learns the alias is 2.5 Flash (not the table's 3.8 Flash): the
    fleet is stopped before any call and the run starts again with 2.5 Flash's settings (the
    double refuses 3.8's thinking level on it, so ok rows prove which settings were sent)."""
    monkeypatch.setenv("GEMINI_API_KEY", "alias-test-key")
    for i in range(4):
        draw_shapes(64, 64, seed=720 + i, count=1)[0].save(images_dir / f"a{i}.png")
    stated = ServerOptions(alias_target=("gemini-flash-latest=gemini-2.5-flash",))
    async with LocalServer(stated) as server:
        api = {"base_url": server.base_url, "model": "gemini-flash-latest"}
        summary = await run(
            _ray(make_config(tmp_path, api=api, task={"kind": "detect"}), workers=2)
        )
        requests = server.stats()["requests"]
    assert (summary.exit_code, summary.rows) == (exits.OK, {"ok": 4}), summary
    assert (
        summary.model_resolution == "gemini-flash-latest → gemini-2.5-flash (the service's answer)"
    )
    assert requests["GET /v1beta/models/gemini-flash-latest"] == {"200": 1}
    assert requests["POST /v1beta/models/gemini-flash-latest:generateContent"] == {"200": 4}


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
        config = _write_config(tmp_path, server.base_url, cluster)
        driver = await _driver(config)
        await until(lambda: _durable(out) >= 20)
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


async def test_the_ray_summary_bills_what_status_bills(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    """Issue 19, item 9: the Ray run's summary billed $0 while `status` billed its rows."""
    from pipeline.commands.status import status

    for i in range(8):
        draw_shapes(96, 96, seed=1900 + i, count=1)[0].save(images_dir / f"c{i}.png")
    summary = await run(_ray(make_config(tmp_path), workers=2))
    assert summary.exit_code == exits.OK
    bill = status(tmp_path / "out")["cost"]["usd"]
    written = json.loads((tmp_path / "out" / ".runs" / f"{summary.run_id}.json").read_text())
    assert bill > 0
    assert summary.cost_usd == pytest.approx(bill, abs=1e-6)
    assert written["cost_usd"] == pytest.approx(bill, abs=1e-6)
    assert written["abandoned"] == 0
