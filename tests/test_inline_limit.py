"""The inline limit of a run: `[api] inline_limit_mb` (20 MB by default, the figure that works
everywhere; at most 100, the live service's interactive limit since 2026-01), and Batch Mode's
own 20 MB, which a batch run holds each request to whatever the setting says
(docs/gemini-api.md § Sending images). Real runs against the local server over loopback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline import exits
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import draw_shapes, make_config, read_rows, run

KEY = "inline-limit-key"
MIB = 1 << 20
FAST = {"poll_seconds": 0.02, "max_poll_seconds": 0.1}  # [batch]: poll often


def big_png(path: Path, extra: int) -> None:
    """A small scene whose PNG file carries `extra` bytes of text chunk (a cheap big file)."""
    image, _ = draw_shapes(96, 96, seed=3)
    padding = PngInfo()
    padding.add_text("pad", "x" * extra)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=padding)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    assert Image.open(path).size == (96, 96)


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)


async def test_batch_mode_uploads_what_only_the_interactive_limit_takes(tmp_path, key_in_env):
    big_png(tmp_path / "images" / "big.png", 16 * MIB)  # base64: about 21.4 MiB inline
    options = ServerOptions(api_key=KEY, batch_seconds=0.1)
    async with LocalServer(options) as server:
        api = {"base_url": server.base_url, "inline_limit_mb": 100}
        common = {"api": api, "task": {"kind": "detect"}}

        live = make_config(tmp_path, output={"dir": str(tmp_path / "live")}, **common)
        assert (await run(live)).exit_code == exits.OK
        (row,) = read_rows(tmp_path / "live")
        assert row["input_mode"] == "inline" and row["status"] == "ok"
        assert server.stats()["uploads"]["started"] == 0  # 21 MiB inline: under 100

        batch_api = {**api, "mode": "batch"}
        batch = make_config(
            tmp_path,
            api=batch_api,
            task={"kind": "detect"},
            batch=FAST,
            output={"dir": str(tmp_path / "batch")},
        )
        assert (await run(batch)).exit_code == exits.OK
        (row,) = read_rows(tmp_path / "batch")
        assert row["status"] == "ok" and row["input_mode"] == "batch"
        assert server.stats()["uploads"]["started"] == 2  # the image, then the job's JSONL

        inline_only = make_config(
            tmp_path,
            api=batch_api,
            task={"kind": "detect"},
            images={"mode": "inline"},
            batch=FAST,
            output={"dir": str(tmp_path / "refused")},
        )
        summary = await run(inline_only)
        assert summary.api_calls == 0 and summary.exit_code == exits.ROWS_NOT_OK
        (row,) = read_rows(tmp_path / "refused")
        assert "exceed Batch Mode's inline limit of 20 MB" in row["error"]
