"""Settings that do not change the request do not redo the row (issue 21 item 3): real runs of
the engine against the local server over loopback, real files, real Parquet."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, settings_hash
from pipeline.inputs.references import identities
from pipeline.inputs.references import load as load_references
from pipeline.tasks import get_task
from tests.conftest import draw_shapes, make_config, read_current, read_rows, run, write_rows

SIZES = {"small.png": (300, 200), "middle.png": (500, 400), "large.png": (800, 600)}


def save_images(folder: Path) -> None:
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        draw_shapes(width, height, seed=40 + seed)[0].save(folder / name)


def with_images(tmp_path: Path, max_side: int | None = None, **sections: dict) -> Config:
    """A detect config, with `max_side` when given (None: the setting left out)."""
    images = {} if max_side is None else {"max_side": max_side}
    return make_config(tmp_path, task={"kind": "detect"}, images=images, **sections)


async def test_max_side_redoes_only_the_images_it_changes(images_dir: Path, tmp_path: Path) -> None:
    save_images(images_dir)
    out = tmp_path / "out"
    assert (await run(with_images(tmp_path))).api_calls == 3
    above = await run(with_images(tmp_path, max_side=4096))  # larger than every image
    assert (above.api_calls, above.skipped) == (0, 3)

    shrinks_one = await run(with_images(tmp_path, max_side=600))
    assert (shrinks_one.api_calls, shrinks_one.skipped) == (1, 2)
    suffixes = {name: row["key"].rpartition(".")[2] for name, row in read_current(out).items()}
    assert suffixes["small.png"] == suffixes["middle.png"] != suffixes["large.png"]  # resized

    again = await run(with_images(tmp_path, max_side=600))
    assert (again.api_calls, again.skipped) == (0, 3)
    other = await run(with_images(tmp_path, max_side=700))  # shrinks the large one otherwise
    assert (other.api_calls, other.skipped) == (1, 2)

    # Back to no max_side: the large image's as-is answer of the first run is copied, not re-paid.
    back = await run(with_images(tmp_path))
    assert (back.api_calls, back.skipped, back.copied) == (0, 2, 1)


async def test_media_resolution_the_model_applies_anyway(images_dir: Path, tmp_path: Path) -> None:
    save_images(images_dir)
    model = {"model": "gemini-3-flash-preview"}

    def config(**task: object) -> Config:
        return make_config(tmp_path, api=model, task={"kind": "detect", **task})

    assert (await run(config())).api_calls == 3
    default = await run(config(media_resolution="high"))  # Gemini 3's level when none is sent
    assert (default.api_calls, default.skipped) == (0, 3)
    low = await run(config(media_resolution="low"))  # another request: every image again
    assert low.api_calls == 3


def legacy_suffix(config: Config) -> str:
    """The key suffix the previous rule gave `config` (`config.settings_hash`)."""
    request = get_task(config.task.kind).request(config.task)
    return settings_hash(config, request, identities(load_references(config)))


@pytest.mark.parametrize("max_side", [None, 600])
async def test_rows_keyed_by_the_previous_rule_are_still_done(
    images_dir: Path, tmp_path: Path, max_side: int | None
) -> None:
    save_images(images_dir)
    config = with_images(tmp_path, max_side=max_side)
    assert (await run(config)).api_calls == 3
    # An output as the previous release wrote it: the same rows under the legacy suffix.
    old_out = tmp_path / "old-out"
    legacy = legacy_suffix(config)
    rows = read_rows(tmp_path / "out")
    for row in rows:
        row["key"] = f"{row['image_sha256']}.{legacy}"
    await write_rows(old_out, "20260101T000000Z-legacy", rows)

    upgraded = with_images(tmp_path, max_side=max_side, output={"dir": str(old_out)})
    summary = await run(upgraded)
    assert (summary.api_calls, summary.skipped, summary.copied) == (0, 3, 0)
    # A max_side above every image after the upgrade: nothing to do for rows the old rule keyed
    # without max_side. The old rule's hash of a config with one hashed that max_side into every
    # row, shrunk or not, so those rows are known only under that very max_side (README).
    bigger = with_images(tmp_path, max_side=4096, output={"dir": str(old_out)})
    assert (await run(bigger)).api_calls == (0 if max_side is None else 3)
