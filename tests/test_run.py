"""End to end: the engine against the local server over loopback, real files, real Parquet."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from pycocotools import mask as cocomask

from pipeline import exits
from pipeline.gemini import GeminiClient
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.run import reuse as reuse_module
from tests.conftest import (
    box_iou,
    draw_shapes,
    make_config,
    mask_iou,
    newest_by_path,
    read_current,
    read_rows,
    run,
    scene_png,
)

pillow_heif.register_heif_opener()


def _save(image: Image.Image, path: Path, fmt: str, orientation: int = 1) -> None:
    """Save as `fmt`; with an EXIF orientation, store the pixels so that they display as drawn."""
    stored = image
    if orientation == 6:  # displayed = stored rotated 90 degrees clockwise
        stored = image.transpose(Image.Transpose.ROTATE_90)
    elif orientation == 3:
        stored = image.transpose(Image.Transpose.ROTATE_180)
    elif orientation == 8:
        stored = image.transpose(Image.Transpose.ROTATE_270)
    kwargs = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    if fmt in ("JPEG", "WEBP", "HEIF"):
        kwargs["quality"] = 90
    stored.save(path, fmt, **kwargs)


@pytest.mark.parametrize("kind", ["segment", "detect"])
async def test_geometry_end_to_end(images_dir: Path, tmp_path: Path, kind: str) -> None:
    """Boxes and masks come back where the shapes were drawn, in every format and orientation."""
    cases = [
        ("plain.png", "PNG", 1, (384, 384)),
        ("photo.jpg", "JPEG", 1, (640, 480)),
        ("rotated-6.jpg", "JPEG", 6, (480, 320)),
        ("rotated-3.png", "PNG", 3, (400, 300)),
        ("rotated-8.jpg", "JPEG", 8, (300, 500)),
        ("phone.heic", "HEIF", 1, (448, 336)),
        ("legacy.bmp", "BMP", 1, (320, 240)),
    ]
    truth = {}
    for i, (name, fmt, orientation, (w, h)) in enumerate(cases):
        image, shapes = draw_shapes(w, h, seed=i)
        _save(image, images_dir / name, fmt, orientation)
        truth[name] = (w, h, shapes)

    summary = await run(make_config(tmp_path, task={"kind": kind}))
    assert summary.exit_code == exits.OK, summary
    rows = read_current(tmp_path / "out")
    assert set(rows) == set(truth)
    for name, (w, h, shapes) in truth.items():
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        assert (row["width"], row["height"]) == (w, h), name
        assert len(row["objects"]) == len(shapes), name
        for shape in shapes:
            best = max(row["objects"], key=lambda o: box_iou(tuple(o["bbox"]), shape.box))
            assert box_iou(tuple(best["bbox"]), shape.box) >= 0.95, (name, best, shape.box)
            if kind == "segment":
                rle = {"size": best["mask"]["size"], "counts": best["mask"]["counts"].encode()}
                decoded = cocomask.decode(rle).astype(bool)
                assert decoded.shape == (h, w)
                assert mask_iou(decoded, shape.mask) >= 0.9, name
            else:
                assert best["mask"] is None


async def test_same_bytes_two_paths_one_call(images_dir: Path, tmp_path: Path) -> None:
    image, _ = draw_shapes(384, 384, seed=1)
    image.save(images_dir / "a.png")
    (images_dir / "sub").mkdir()
    (images_dir / "sub" / "b.png").write_bytes((images_dir / "a.png").read_bytes())
    summary = await run(make_config(tmp_path))
    assert summary.api_calls == 1
    rows = read_rows(tmp_path / "out")
    assert sorted(r["image_path"] for r in rows) == ["a.png", "sub/b.png"]
    assert rows[0]["objects"] == rows[1]["objects"]
    assert rows[0]["key"] == rows[1]["key"]

    # A third path with the same bytes on a later run: copied from the committed row, no call.
    (images_dir / "c.png").write_bytes((images_dir / "a.png").read_bytes())
    summary = await run(make_config(tmp_path))
    assert (summary.api_calls, summary.skipped, summary.copied) == (0, 2, 1)
    rows = read_current(tmp_path / "out")
    assert rows["c.png"]["objects"] == rows["a.png"]["objects"]
    assert rows["c.png"]["prompt_tokens"] is None  # nothing was billed for it


async def test_same_bytes_far_apart_in_one_run_one_call(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate met long after its twin was answered (no longer among the recent answers,
    its row maybe still buffered) is copied from the committed row, not paid for again."""
    monkeypatch.setattr(reuse_module, "RECENT_ANSWERS", 0)
    monkeypatch.setattr(reuse_module, "SINK_BACKLOG", 0)
    image, _ = draw_shapes(256, 256, seed=3)
    image.save(images_dir / "a.png")
    for i in range(5):
        draw_shapes(256, 256, seed=30 + i)[0].save(images_dir / f"m{i}.png")
    (images_dir / "z.png").write_bytes((images_dir / "a.png").read_bytes())
    # rows_per_part 1: the recent tier holds 2 answers, the twin is 5 answers back
    config = make_config(tmp_path, limits={"concurrency": 1}, output={"rows_per_part": 1})
    summary = await run(config)
    assert (summary.api_calls, summary.copied) == (6, 1)
    rows = read_current(tmp_path / "out")
    assert rows["z.png"]["objects"] == rows["a.png"]["objects"]
    assert rows["z.png"]["attempts"] == 0


async def test_copies_far_from_their_twins_keep_parts_full(
    images_dir: Path, tmp_path: Path
) -> None:
    """Issue 19: 300 images, then a folder (walked later) with a copy of each. A copy costs a
    stat, a hash and a row: no call, and no part of its own (each copy used to force a commit of
    what the sink held to read its twin's row back: one tiny part a copy)."""
    originals, copies = images_dir / "a", images_dir / "z-copies"
    originals.mkdir()
    copies.mkdir()
    for i in range(300):
        data = scene_png(i, size=(32, 32))
        (originals / f"{i:03d}.png").write_bytes(data)
        (copies / f"{i:03d}.png").write_bytes(data)
    config = make_config(
        tmp_path,
        task={"kind": "detect"},
        output={"rows_per_part": 100, "flush_seconds": 3600},  # parts cut by rows, not time
        limits={"concurrency": 8},
    )
    summary = await run(config)
    assert (summary.api_calls, summary.copied) == (300, 300)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 600
    parts = list((tmp_path / "out").glob("data/*.parquet"))
    assert len(parts) <= 600 // 100 + 1  # full parts, and what was left at the end
    by_path = {r["image_path"]: r for r in rows}
    assert all(
        by_path[f"z-copies/{i:03d}.png"]["objects"] == by_path[f"a/{i:03d}.png"]["objects"]
        for i in range(300)
    )


def _huge_png(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming huge dimensions: a decompression bomb in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


async def test_bad_files_become_error_rows(images_dir: Path, tmp_path: Path) -> None:
    good, _ = draw_shapes(384, 384, seed=2)
    good.save(images_dir / "good.png")
    good.save(images_dir / "ünïcødé 画像 name.png")
    (images_dir / "empty.png").write_bytes(b"")
    (images_dir / "notes.jpg").write_text("this is not an image\n")
    data = (images_dir / "good.png").read_bytes()
    good.save(images_dir / "full.jpg", "JPEG")
    (images_dir / "truncated.jpg").write_bytes((images_dir / "full.jpg").read_bytes()[:800])
    _huge_png(images_dir / "bomb.png", 40000, 40000)
    (images_dir / "loop").symlink_to(images_dir, target_is_directory=True)
    (images_dir / "dangling.png").symlink_to(images_dir / "missing.png")
    assert data

    config = make_config(tmp_path, input={"follow_symlinks": True})
    summary = await run(config)
    assert summary.exit_code == exits.ROWS_NOT_OK
    rows = read_current(tmp_path / "out")
    assert rows["good.png"]["status"] == "ok"
    assert rows["ünïcødé 画像 name.png"]["status"] == "ok"
    assert rows["full.jpg"]["status"] == "ok"
    for name in ("empty.png", "notes.jpg", "truncated.jpg", "bomb.png", "dangling.png"):
        assert rows[name]["status"] == "error", name
        assert rows[name]["error"], name
    assert any(p.startswith("loop") and r["status"] == "error" for p, r in rows.items())
    assert "empty" in rows["empty.png"]["error"]


async def test_resume_retry_errors_and_changed_prompt(images_dir: Path, tmp_path: Path) -> None:
    for i in range(4):
        draw_shapes(384, 384, seed=10 + i)[0].save(images_dir / f"img{i}.png")
    (images_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    config = make_config(tmp_path)
    first = await run(config)
    assert first.api_calls == 4 and first.exit_code == exits.ROWS_NOT_OK

    again = await run(config)  # nothing new: error rows are not redone by default
    assert (again.api_calls, again.skipped, sum(again.rows.values())) == (0, 5, 0)

    draw_shapes(384, 384, seed=20)[0].save(images_dir / "new.png")  # a scheduled run's new file
    nightly = await run(config)
    assert (nightly.api_calls, sum(nightly.rows.values())) == (1, 1)

    (images_dir / "broken.png").unlink()
    draw_shapes(384, 384, seed=21)[0].save(images_dir / "broken.png")  # fixed upstream
    fixed = await run(config)
    assert fixed.api_calls == 1  # a changed file (size, mtime) is not the committed one

    retried = await run(config, retry_errors=True)
    assert retried.api_calls == 0  # nothing left in error

    prompt = "Give the segmentation masks of all shapes as a JSON list (box_2d, mask, label)."
    changed = make_config(tmp_path, task={"kind": "segment", "prompt": prompt})
    redone = await run(changed)
    assert redone.api_calls == 6  # a changed prompt changes every key
    # Every row was superseded: the run's end set the old answers aside in .superseded/ (paid
    # for: kept), so a glob sees one row per image.
    assert Counter(r["image_path"] for r in read_rows(tmp_path / "out"))["img0.png"] == 1
    rows = read_rows(tmp_path / "out") + read_rows(tmp_path / "out" / ".superseded")
    assert Counter(r["image_path"] for r in rows)["img0.png"] == 2
    assert all(r["status"] == "ok" for r in newest_by_path(rows).values())


async def test_faults_and_storms_account_for_every_image(images_dir: Path, tmp_path: Path) -> None:
    for i in range(24):
        draw_shapes(256, 256, seed=100 + i, count=2)[0].save(images_dir / f"f{i:02d}.png")
    config = make_config(
        tmp_path,
        local={"fault_rate": 0.35, "seed": 7},
        limits={"concurrency": 6, "max_attempts": 5},
        api={"base_url": "local", "model": "gemini-2.5-flash", "timeout": 2},
    )
    summary = await run(config)
    rows = read_rows(tmp_path / "out")
    assert sorted(r["image_path"] for r in rows) == [f"f{i:02d}.png" for i in range(24)]
    assert summary.retries > 0
    statuses = Counter(r["status"] for r in rows)
    assert statuses["ok"] + statuses["partial"] >= 18, statuses
    for row in rows:
        if row["status"] == "error":
            assert row["error"]
        assert row["raw_response"] or row["status"] == "error"


async def test_daily_limit_stops_cleanly_and_says_when(images_dir: Path, tmp_path: Path) -> None:
    for i in range(6):
        draw_shapes(256, 256, seed=200 + i, count=1)[0].save(images_dir / f"d{i}.png")
    config = make_config(tmp_path, limits={"rpd": 3, "concurrency": 1})
    summary = await run(config)
    assert summary.exit_code == exits.STOPPED
    assert summary.api_calls == 3
    assert "midnight Pacific" in summary.resume_hint
    assert len(read_rows(tmp_path / "out")) == 3
    again = await run(config)  # same quota day: nothing more is sent
    assert again.api_calls == 0 and again.exit_code == exits.STOPPED
    summaries = list((tmp_path / "out" / ".runs").glob("*.json"))
    assert len(summaries) == 2
    assert json.loads(summaries[0].read_text())["exit_code"] == exits.STOPPED


async def test_upload_mode_reuses_and_deletes(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    for i in range(3):
        draw_shapes(384, 384, seed=300 + i)[0].save(images_dir / f"u{i}.png")
    async with LocalServer(ServerOptions(api_key="test-key")) as server:
        api = {"base_url": server.base_url}
        config = make_config(tmp_path, api=api, images={"mode": "upload", "delete_uploads": False})
        first = await run(config)
        assert first.exit_code == exits.OK and first.uploads == 3
        rows = read_rows(tmp_path / "out")
        assert {r["input_mode"] for r in rows} == {"upload"}
        # Another task over the same bytes reuses the living uploads, then deletes them.
        detect = make_config(
            tmp_path,
            api=api,
            task={"kind": "detect"},
            images={"mode": "upload", "delete_uploads": True},
        )
        second = await run(detect)
        assert second.exit_code == exits.OK
        assert (second.uploads, second.uploads_reused) == (0, 3)
        async with GeminiClient("test-key", base_url=server.base_url) as client:
            assert await client.list_files() == []
        # Uploads that vanished server-side (expired, deleted elsewhere) are uploaded again.
        keep = {"mode": "upload", "delete_uploads": False}
        third = await run(make_config(tmp_path, api=api, task={"kind": "caption"}, images=keep))
        assert third.uploads == 3
        async with GeminiClient("test-key", base_url=server.base_url) as client:
            for info in await client.list_files():
                await client.delete_file(info.name)
        task = {"kind": "custom", "prompt": "Count the shapes. Answer as JSON."}
        fourth = await run(make_config(tmp_path, api=api, task=task, images=keep))
        assert fourth.exit_code == exits.OK
        assert (fourth.uploads_reused, fourth.uploads) == (3, 3)


async def test_auto_mode_uploads_what_does_not_fit_inline(images_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (600, 600, 3), dtype=np.uint8))
    noisy.save(images_dir / "big.png")  # ~1 MB of noise: over a 0.5 MB inline limit
    draw_shapes(256, 256, seed=5)[0].save(images_dir / "small.png")
    config = make_config(tmp_path, api={"inline_limit_mb": 0.5})
    summary = await run(config)
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert rows["big.png"]["input_mode"] == "upload"
    assert rows["small.png"]["input_mode"] == "inline"
    assert summary.uploads == 1


async def test_interactions_flavor(images_dir: Path, tmp_path: Path) -> None:
    draw_shapes(384, 384, seed=8)[0].save(images_dir / "i.png")
    config = make_config(
        tmp_path,
        api={"model": "gemini-3-flash-preview", "flavor": "interactions"},
        task={"kind": "detect"},
    )
    summary = await run(config)
    assert summary.exit_code == exits.OK
    (row,) = read_rows(tmp_path / "out")
    assert row["objects"] and row["prompt_tokens"] >= 1120  # Gemini 3's default image budget
    assert row["est_image_tokens"] == 1120


async def test_api_key_never_leaks(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    secret = "AIzaSy-super-secret-key-0123456789"
    monkeypatch.setenv("GEMINI_API_KEY", secret)
    draw_shapes(256, 256, seed=9)[0].save(images_dir / "k.png")
    summary = await run(make_config(tmp_path), progress=True)
    assert summary.exit_code == exits.OK
    captured = capsys.readouterr()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in captured.out + captured.err
    assert secret not in repr(summary)
    assert os.environ["GEMINI_API_KEY"] == secret


async def test_429_storm_slows_the_pool_and_loses_nothing(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server quota far below what the pool would send, with no client limit configured:
    the pool backs off on retryDelay, discovers the rate, and every image ends ok."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    for i in range(24):
        draw_shapes(128, 128, seed=700 + i, count=1)[0].save(images_dir / f"s{i:02d}.png")
    options = ServerOptions(api_key="test-key", rpm=6, quota_window_seconds=1.0)
    async with LocalServer(options) as server:
        config = make_config(
            tmp_path,
            api={"base_url": server.base_url},
            limits={"concurrency": 8, "max_attempts": 10},
            task={"kind": "detect"},
        )
        summary = await run(config)
        stats = server.stats()
    assert summary.throttled > 0
    assert summary.exit_code == exits.OK, summary.rows
    rows = read_rows(tmp_path / "out")
    assert sorted(r["image_path"] for r in rows) == [f"s{i:02d}.png" for i in range(24)]
    assert max(r["attempts"] for r in rows) > 1
    assert stats  # the server saw the storm too


async def test_the_pool_keeps_its_concurrency_in_flight(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slow server, throughput is concurrency / latency: every worker stays busy."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    for i in range(64):
        Image.new("RGB", (32, 32), (i * 3, 200, 7)).save(images_dir / f"l{i:02d}.png")
    async with LocalServer(ServerOptions(latency_ms=200, seed=1)) as server:
        config = make_config(
            tmp_path,
            api={"base_url": server.base_url},
            limits={"concurrency": 8},
            task={"kind": "detect"},
        )
        await run(config)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 64
    ends = [r["completed_at"].timestamp() for r in rows]
    starts = [end - r["latency_ms"] / 1000 for end, r in zip(ends, rows, strict=True)]
    busy = sum(r["latency_ms"] for r in rows) / 1000
    in_flight = busy / (max(ends) - min(starts))
    assert in_flight >= 0.6 * 8, in_flight
