"""`pipeline prune`: rows of inputs that disappeared are counted first, then set aside (kept in
`.superseded/`: paid for), readers of `data/` no longer see them, the next run does not redo
anything; a root the walk finds nothing under is never judged (an unmounted disk)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.output.parts import current_rows
from tests.conftest import read_rows, run, save_scenes

CONFIG = """
[api]
base_url = "local"
model = "gemini-2.5-flash"
[input]
paths = ["images"]
[task]
kind = "caption"
[output]
dir = "out"
"""


def paths(out: Path) -> list[str]:
    return sorted(current_rows(out, ["image_path"]).column("image_path").to_pylist())


async def prune(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert await asyncio.to_thread(main, ["prune", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


async def test_prune_counts_then_sets_aside_rows_of_deleted_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(CONFIG)
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    save_scenes(images, 5, prefix="p", seed=3)
    config = load_config(tmp_path / "config.toml")
    assert (await run(config)).api_calls == 5
    for name in ("p001.png", "p003.png"):
        (images / name).unlink()

    args = (str(out), "--config", str(tmp_path / "config.toml"))
    dry = await prune(capsys, *args)
    assert (dry["gone"], dry["rows"], dry["applied"]) == (2, 5, False)
    assert sorted(dry["examples"]) == ["p001.png", "p003.png"]
    assert len(paths(out)) == 5  # the dry run changed nothing

    done = await prune(capsys, *args, "--apply")
    assert (done["gone"], done["applied"], done["rows_set_aside"]) == (2, True, 2)
    assert paths(out) == ["p000.png", "p002.png", "p004.png"]
    assert sorted(r["image_path"] for r in read_rows(out)) == paths(out)  # a plain reader too
    aside = sorted(r["image_path"] for r in read_rows(out / ".superseded"))
    assert aside == ["p001.png", "p003.png"]  # paid for: kept
    assert (await run(config)).api_calls == 0
    assert (await prune(capsys, *args))["gone"] == 0


async def test_a_root_that_yields_nothing_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(CONFIG)
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    save_scenes(images, 3, prefix="q", seed=9)
    assert (await run(load_config(tmp_path / "config.toml"))).api_calls == 3
    for path in images.iterdir():  # the disk unmounted: the folder is there, empty
        path.unlink()
    report = await prune(capsys, str(out), "--config", str(tmp_path / "config.toml"), "--apply")
    assert (report["gone"], report["rows_left_alone"], report["applied"]) == (0, 3, False)
    assert len(paths(out)) == 3
