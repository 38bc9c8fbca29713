"""Runs with the current models' defaults against the strict local server: all ok, whole answers."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.commands.reparse import reparse
from pipeline.config import ConfigError, require_available
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import draw_shapes, make_config, read_rows, run


@pytest.mark.parametrize("flavor", ["generateContent", "interactions"])
@pytest.mark.parametrize(
    "model", ["gemini-3.8-flash", "gemini-3.7-flash", "gemini-3.6-flash", "gemini-flash-latest"]
)
async def test_current_models_with_their_defaults_are_all_ok(
    images_dir: Path, tmp_path: Path, model: str, flavor: str
) -> None:
    """The defaults once sent thinking_level "minimal" to every 3.x model: a 400 on 3.7/3.8."""
    truth = {}
    for i in range(4):
        image, shapes = draw_shapes(160, 120, seed=40 + i)
        image.save(images_dir / f"s{i}.png")
        truth[f"s{i}.png"] = len(shapes)
    config = make_config(tmp_path, api={"model": model, "flavor": flavor})
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    rows = read_rows(tmp_path / "out")
    assert {r["image_path"]: len(r["objects"]) for r in rows} == truth
    assert all(o["mask"] is not None for r in rows for o in r["objects"])


async def test_continuation_hops_make_whole_answers_and_reparse_reads_them(
    images_dir: Path, tmp_path: Path
) -> None:
    """A per-request decode limit cuts each Interactions answer into hops: the rows hold the
    whole answer (never `partial`), the raw answer keeps every hop, and reparse agrees."""
    for i in range(3):
        draw_shapes(200, 160, seed=60 + i, count=3)[0].save(images_dir / f"h{i}.png")
    config = make_config(
        tmp_path,
        api={"model": "gemini-3.8-flash", "flavor": "interactions"},
        local={"decode_limit": 40},
    )
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    rows = sorted(read_rows(tmp_path / "out"), key=lambda r: r["image_path"])
    assert {r["status"] for r in rows} == {"ok"}
    assert all(len(r["objects"]) == 3 for r in rows)
    for row in rows:
        hops = json.loads(row["raw_response"])
        assert isinstance(hops, list) and len(hops) > 1  # each hop's body, as received
    report = await asyncio.to_thread(reparse, str(tmp_path / "out"))
    assert report["status_changes"] == {"ok->ok": 3}


@pytest.mark.parametrize(
    ("model", "replacement"),
    [
        ("gemini-2.5-pro", "gemini-3.1-pro-preview"),
        ("gemini-3-pro-preview", "gemini-3.1-pro-preview"),
        ("gemini-2.0-flash", "gemini-2.5-flash"),
    ],
)
async def test_a_shut_down_model_is_refused_before_any_call(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, replacement: str
) -> None:
    """Issue 18: shut-down models (the deprecations page) were offered as usable and failed at
    the first call; now the run stops at its config, naming the replacement, and sends nothing."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    draw_shapes(96, 96, seed=1)[0].save(images_dir / "a.png")
    async with LocalServer(ServerOptions(api_key="test-key")) as server:
        api = {"base_url": server.base_url, "model": model}
        config = make_config(tmp_path, api=api, task={"kind": "detect"})
        with pytest.raises(ConfigError, match=rf"shut down on 20\d\d-\d\d-\d\d; use {replacement}"):
            await run(config)
        assert server.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")


def test_shut_down_is_a_date_not_a_flag(tmp_path: Path) -> None:
    """The day before its shut-down a model is still usable (estimates of old runs, tests)."""
    config = make_config(tmp_path, api={"model": "gemini-2.5-pro"}, task={"kind": "detect"})
    require_available(config, on=date(2026, 6, 16))
    with pytest.raises(ConfigError, match=r'test-config.toml: \[api\] model = "gemini-2.5-pro"'):
        require_available(config, on=date(2026, 6, 17))


async def test_a_model_the_config_adds_runs_against_the_bundled_server(
    images_dir: Path, tmp_path: Path
) -> None:
    """A `[models]` entry reaches the in-process server (`base_url = "local"`): the model is
    served, with the settings of the entry it starts from (polygon masks, as 3.8 Flash)."""
    draw_shapes(160, 120, seed=7)[0].save(images_dir / "a.png")
    config = make_config(
        tmp_path,
        api={"model": "gemini-3.9-flash"},
        models={"gemini-3.9-flash": {"like": "gemini-3.8-flash"}},
    )
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    (row,) = read_rows(tmp_path / "out")
    assert row["objects"] and all(o["mask"] is not None for o in row["objects"])
