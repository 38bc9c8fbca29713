"""Reference images end to end: sent with every request (inline when small, uploaded once when
not), never answered about, part of the key, uploaded again when the upload expires mid-run,
counted by the estimate as the server bills them."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import exits
from pipeline.commands.estimate import estimate, format_estimate
from pipeline.config import ConfigError, with_overrides
from pipeline.inputs.references import REFERENCE_INLINE_BYTES
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.run.identity import key_suffix
from tests.conftest import box_iou, draw_shapes, make_config, read_current, read_rows, run


def _targets(images_dir: Path, count: int = 2) -> dict[str, list]:
    truth = {}
    for i in range(count):
        image, shapes = draw_shapes(120, 90, seed=40 + i, count=2)
        image.save(images_dir / f"t{i}.png")
        truth[f"t{i}.png"] = shapes
    return truth


def _big_reference(path: Path) -> None:
    """Shapes a model would report, on noise that makes the PNG too big to inline."""
    image, _ = draw_shapes(360, 360, seed=90, count=3)
    pixels = np.asarray(image).copy()
    rng = np.random.default_rng(7)
    pixels[-260:] = rng.integers(0, 256, size=pixels[-260:].shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    assert path.stat().st_size > REFERENCE_INLINE_BYTES


def _check_targets(rows: dict[str, dict], truth: dict[str, list]) -> None:
    """Exactly the targets' shapes: nothing seen in a reference image is reported."""
    assert set(rows) == set(truth)
    for name, shapes in truth.items():
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        assert len(row["objects"]) == len(shapes), (name, row["objects"])
        for shape in shapes:
            best = max(row["objects"], key=lambda o: box_iou(tuple(o["bbox"]), shape.box))
            assert box_iou(tuple(best["bbox"]), shape.box) >= 0.9


async def test_references_go_with_every_request_and_are_never_answered(
    images_dir: Path, tmp_path: Path
) -> None:
    truth = _targets(images_dir, 3)
    draw_shapes(100, 80, seed=91, count=2)[0].save(tmp_path / "small.png")
    _big_reference(tmp_path / "big.png")
    references = ["small.png", {"image": "big.png", "caption": "a cracked weld"}]
    config = make_config(
        tmp_path,
        task={"kind": "detect", "reference_images": references},
        limits={"concurrency": 1},
    )
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    assert (summary.api_calls, summary.uploads) == (3, 1)  # the big one: uploaded once
    rows = read_current(tmp_path / "out")
    _check_targets(rows, truth)
    per_request = 3 * 258  # small, big (360 px: one tile), the target
    for row in rows.values():
        assert row["est_image_tokens"] == per_request
        # billed by the server's own count of every image and text part it received
        assert abs(row["prompt_tokens"] - row["est_prompt_tokens"]) <= 2
        assert row["input_mode"] == "inline" and row["members"] is None

    # the same config again: nothing to do; the estimate of a first run (into an empty
    # output) prices what the server billed
    assert (await run(config)).skipped == 3
    assert estimate(config)["plan"]["nothing_to_do"]
    report = estimate(with_overrides(config, {"output.dir": str(tmp_path / "empty")}))
    assert report["reference_tokens_per_request"] == 2 * 258
    assert report["reference_tokens"] == 3 * 2 * 258
    billed = sum(row["prompt_tokens"] for row in rows.values())
    assert abs(report["input_tokens"] - billed) <= 6
    assert "+ 2 reference images 1,548 (516 a request)" in format_estimate(report)


async def test_reference_bytes_and_captions_are_part_of_the_key(
    images_dir: Path, tmp_path: Path
) -> None:
    _targets(images_dir, 2)
    draw_shapes(64, 64, seed=1, count=1)[0].save(tmp_path / "ref.png")

    def config(caption: str):
        reference = {"image": "ref.png", "caption": caption}
        return make_config(tmp_path, task={"kind": "detect", "reference_images": [reference]})

    plain = make_config(tmp_path, task={"kind": "detect"})
    first = config("an example")
    assert len({key_suffix(plain), key_suffix(first), key_suffix(config("another"))}) == 3
    assert (await run(first)).api_calls == 2
    assert (await run(first)).api_calls == 0
    assert (await run(config("another example"))).api_calls == 2
    draw_shapes(64, 64, seed=2, count=1)[0].save(tmp_path / "ref.png")  # new bytes, same path
    assert (await run(first)).api_calls == 2
    moved = tmp_path / "moved.png"
    moved.write_bytes((tmp_path / "ref.png").read_bytes())  # same bytes elsewhere: same key
    reference = {"image": str(moved), "caption": "an example"}
    same = make_config(tmp_path, task={"kind": "detect", "reference_images": [reference]})
    assert key_suffix(same) == key_suffix(first)


async def test_an_expired_reference_upload_is_uploaded_again_mid_run(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's clock passes the upload's expiry after two answers: the next request is
    refused (403), the run finds the reference gone, uploads it again and loses nothing."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    truth = _targets(images_dir, 5)
    _big_reference(tmp_path / "big.png")
    start = time.time()
    server: list[LocalServer] = []

    def clock() -> float:
        answered = sum(server[0].stats()["answers_by_task"].values()) if server else 0
        return start + (200.0 if answered >= 2 else 0.0)  # past the 100 s lifetime

    options = ServerOptions(api_key="test-key", file_ttl_seconds=100)
    async with LocalServer(options, clock=clock) as local:
        server.append(local)
        config = make_config(
            tmp_path,
            api={"base_url": local.base_url},
            task={"kind": "detect", "reference_images": ["big.png"]},
            limits={"concurrency": 1},
        )
        summary = await run(config)
        stats = local.stats()
    assert summary.exit_code == exits.OK, summary
    assert summary.uploads == 2 and summary.retries == 1
    assert stats["files"]["expired"] >= 1
    assert stats["responses_by_status"].get("403") == 2  # the refused request and the check
    _check_targets(read_current(tmp_path / "out"), truth)


@pytest.fixture
def web_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain HTTP server on loopback serving a folder (a reference image by URL)."""
    folder = tmp_path / "web"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_a_reference_by_url_is_fetched_once(
    images_dir: Path, tmp_path: Path, web_folder: tuple[Path, str]
) -> None:
    folder, base = web_folder
    truth = _targets(images_dir, 2)
    draw_shapes(80, 80, seed=5, count=2)[0].save(folder / "example.png")
    local = make_config(
        tmp_path, task={"kind": "detect", "reference_images": [str(folder / "example.png")]}
    )
    loopback = {"paths": [str(images_dir)], "allow_hosts": ["127.0.0.1"]}  # the test's host
    by_url = make_config(
        tmp_path,
        input=loopback,
        task={"kind": "detect", "reference_images": [f"{base}/example.png"]},
    )
    assert by_url.task.reference_images[0].image == f"{base}/example.png"  # not a path
    assert key_suffix(by_url) == key_suffix(local)  # the same bytes: the same key
    assert (await run(by_url)).exit_code == exits.OK
    _check_targets(read_current(tmp_path / "out"), truth)
    missing = make_config(
        tmp_path, input=loopback, task={"kind": "detect", "reference_images": [f"{base}/no.png"]}
    )
    with pytest.raises(ConfigError, match=r"\[task\] reference_images: http://.*/no.png: HTTP"):
        await run(missing)


async def test_a_reference_that_cannot_be_used_stops_the_run_before_a_call(
    images_dir: Path, tmp_path: Path
) -> None:
    _targets(images_dir, 1)
    (tmp_path / "notes.png").write_text("not an image")
    for name, why in (("notes.png", "notes.png: "), ("gone.png", "gone.png: ")):
        config = make_config(tmp_path, task={"kind": "detect", "reference_images": [name]})
        with pytest.raises(
            ConfigError, match=rf"test-config.toml: \[task\] reference_images: .*{why}"
        ):
            await run(config)
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"\[task\] reference_images must be a list"):
        make_config(tmp_path, task={"reference_images": [{"image": "a.png", "note": "x"}]})


async def test_references_with_a_group(images_dir: Path, tmp_path: Path) -> None:
    """Reference images first, then the group's images: objects are placed in the group's
    images only, by their index."""
    truth = {}
    for i in range(2):
        image, shapes = draw_shapes(110, 90, seed=60 + i, count=2)
        (images_dir / "pair").mkdir(exist_ok=True)
        image.save(images_dir / "pair" / f"{i}.png")
        truth[i] = shapes
    draw_shapes(90, 90, seed=61, count=3)[0].save(tmp_path / "ref.png")
    config = make_config(
        tmp_path,
        input={"group_by": "folder"},
        task={"kind": "detect", "reference_images": [{"image": "ref.png", "caption": "good"}]},
    )
    assert (await run(config)).exit_code == exits.OK
    (row,) = read_rows(tmp_path / "out")
    assert sorted({o["image"] for o in row["objects"]}) == [0, 1]
    for index, shapes in truth.items():
        placed = [o for o in row["objects"] if o["image"] == index]
        assert len(placed) == len(shapes)
        for shape in shapes:
            assert max(box_iou(tuple(o["bbox"]), shape.box) for o in placed) >= 0.9


def test_the_shipped_reference_config_reads_its_references() -> None:
    from pipeline.config import load_config
    from pipeline.inputs.references import load

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "references.toml")
    (loaded,) = load(config)
    assert loaded.caption.startswith("Reference image 1: a circle")
    assert loaded.item.data and (loaded.item.width, loaded.item.height) == (128, 128)


async def test_references_forced_inline_over_the_limit_stop_before_any_row(
    images_dir: Path, tmp_path: Path
) -> None:
    _targets(images_dir, 2)
    _big_reference(tmp_path / "big.png")
    config = make_config(
        tmp_path,
        task={"kind": "detect", "reference_images": ["big.png"]},
        images={"mode": "inline"},
        api={"inline_limit_mb": 0.25},
    )
    with pytest.raises(ConfigError, match=r"inline reference images take .* use \[images\] mode"):
        await run(config)
    assert not read_rows(tmp_path / "out")
