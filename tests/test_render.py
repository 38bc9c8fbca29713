"""The gallery: overlays drawn right, hostile model text kept harmless, checked in a browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.commands.exports.dataset import RootMap
from pipeline.commands.render import MASK_ALPHA, _colour, render
from tests.conftest import result_object, result_row, write_rows

BACKGROUND = (40, 40, 40)
HOSTILE = [
    '<script>document.body.dataset.pwned = "1"</script>',
    "../../etc/passwd",
    '"><img src=x onerror="document.body.dataset.pwned=2">',
]


def row(
    path: str,
    status: str = "ok",
    objects: list | None = None,
    *,
    root: str,
    width: int = 200,
    height: int = 150,
    task: str = "segment",
    **extra: Any,
) -> dict:
    return result_row(
        path,
        root=root,
        task=task,
        status=status,
        width=width,
        height=height,
        objects=objects,
        **extra,
    )


@pytest.fixture
async def output(tmp_path: Path) -> dict[str, Path]:
    """Sources on disk (one EXIF-rotated, one large, one missing) and their rows via the sink."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 150), BACKGROUND).save(images / "a.png")
    Image.new("RGB", (200, 150), (128, 128, 128)).save(images / "caption.png")
    rotated = Image.new("RGB", (120, 80), BACKGROUND)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait 80x120
    rotated.save(images / "rotated.jpg", exif=exif)
    Image.new("RGB", (2000, 1000), (90, 120, 150)).save(images / "big.jpg")

    yy, xx = np.mgrid[:150, :200]
    disc = (xx - 60) ** 2 + (yy - 70) ** 2 <= 30**2
    root = str(images)
    rows = [
        row(
            "a.png",
            objects=[
                result_object("cat", (30, 40, 91, 101), disc),
                result_object(HOSTILE[0], (120, 20, 190, 60)),
                result_object(HOSTILE[1], (120, 70, 190, 100)),
                result_object(HOSTILE[2], (120, 105, 190, 140)),
            ],
            root=root,
        ),
        row(
            "rotated.jpg",
            objects=[result_object("dog", (10, 10, 70, 60))],
            root=root,
            width=80,
            height=120,
        ),
        row(
            "big.jpg",
            objects=[result_object("sky", (0, 0, 2000, 400))],
            root=root,
            width=2000,
            height=1000,
        ),
        row("missing.jpg", objects=[result_object("ghost", (10, 10, 50, 50))], root=root),
        row("../outside.png", objects=[], root=root),
        row("caption.png", task="caption", text="<i>a grey square</i>", root=root),
        row("broken.jpg", "error", error='<b>400</b> "bad" & worse', root=root),
        row("unsafe.jpg", "blocked", error="SAFETY <script>", root=root),
    ]
    await write_rows(tmp_path / "out", "r1", rows)
    return {"out": tmp_path / "out", "gallery": tmp_path / "gallery", "images": images}


class _Page(HTMLParser):
    """Tags and text of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def close(pixel: np.ndarray, colour: tuple[float, ...], tolerance: float = 8) -> bool:
    return bool(np.abs(pixel.astype(float) - np.asarray(colour)).max() <= tolerance)


async def test_overlays_and_page(output: dict[str, Path]) -> None:
    report = render(output["out"], output["gallery"])
    assert report["entries"] == 6 and report["missing_sources"] == 2
    assert report["problems"] == 2
    names = sorted(p.name for p in (output["gallery"] / "images").iterdir())
    assert names == [f"{n:06d}.jpg" for n in range(1, 7)]  # from a counter, never a label
    assert not any(p.name != "index.html" for p in output["gallery"].glob("*") if p.is_file())

    # Entries come in path order: ../outside.png, a.png, big.jpg, caption.png, missing, rotated.
    overlay = np.asarray(Image.open(output["gallery"] / "images" / "000002.jpg"))
    assert overlay.shape == (150, 200, 3)
    cat = np.asarray(_colour("cat"), dtype=float)
    blended = np.asarray(BACKGROUND) * (1 - MASK_ALPHA) + cat * MASK_ALPHA
    assert close(overlay[70, 60], blended)  # inside the disc mask
    assert close(overlay[45, 10], BACKGROUND)  # outside every box and mask
    assert close(overlay[70, 31], cat, tolerance=40)  # on the box outline
    with Image.open(output["gallery"] / "images" / "000003.jpg") as big:
        assert big.size == (1024, 512)
    with Image.open(output["gallery"] / "images" / "000006.jpg") as rotated:
        assert rotated.size == (80, 120)  # EXIF orientation applied
    with Image.open(output["gallery"] / "images" / "000005.jpg") as placeholder:
        assert placeholder.size == (200, 150)

    page = (output["gallery"] / "index.html").read_text(encoding="utf-8")
    parsed = parse(page)
    assert [tag for tag, _ in parsed.tags].count("script") == 1
    assert all(
        attrs.get("src", "").startswith("images/") for tag, attrs in parsed.tags if tag == "img"
    )
    assert all("onerror" not in attrs for _, attrs in parsed.tags)
    text = "".join(parsed.text)
    for label in HOSTILE:
        assert label in text  # shown as text, in the label table
    assert '<b>400</b> "bad" & worse' in text and "<i>a grey square</i>" in text
    assert "SAFETY <script>" in text
    assert "source image not found" in text and "path outside its root" in text
    assert re.search(r"<td>ok</td><td class=\"n\">6</td>", page)
    assert re.search(r"<td>error</td><td class=\"n\">1</td>", page)
    assert re.search(r"<td>blocked</td><td class=\"n\">1</td>", page)
    assert "Content-Security-Policy" in page and "http" not in page.replace("http-equiv", "")


async def test_limit_and_moved_images(output: dict[str, Path], tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(output["images"], moved)
    shutil.rmtree(output["images"])
    report = render(output["out"], output["gallery"], limit=2)
    assert report["entries"] == 2 and report["missing_sources"] == 2  # outside + a.png gone
    report = render(output["out"], output["gallery"], limit=3, roots=RootMap.parse(str(moved)))
    assert report["entries"] == 3 and report["missing_sources"] == 1  # only ../outside.png
    assert len(list((output["gallery"] / "images").iterdir())) == 3  # stale overlays removed


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_gallery_in_a_headless_browser(output: dict[str, Path], tmp_path: Path) -> None:
    render(output["out"], output["gallery"])
    url = (output["gallery"] / "index.html").as_uri()
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    parsed = parse(dom)
    body = next(attrs for tag, attrs in parsed.tags if tag == "body")
    assert body.get("data-checked") == "yes"  # our script ran (the CSP allows it by hash)
    assert "data-pwned" not in body  # no label's script ran
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 6
    assert {attrs["data-state"] for attrs in images} == {"loaded"}
    assert sorted(int(attrs["data-natural-width"]) for attrs in images) == [
        80,
        200,
        200,
        200,
        200,
        1024,
    ]
    assert HOSTILE[0] in "".join(parsed.text)

    shot = tmp_path / "gallery.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        assert np.asarray(image.convert("L")).std() > 10  # not a blank page
