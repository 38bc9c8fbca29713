"""Shared helpers for the end-to-end tests: shape images with exact truth, configs, outputs."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image, ImageDraw

from pipeline.config import Config, parse_config

COLORS = [(220, 40, 40), (40, 170, 70), (40, 80, 220), (235, 200, 40), (140, 60, 170)]


@dataclass
class Shape:
    kind: str  # rectangle | circle
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in displayed pixels
    mask: np.ndarray  # bool HxW of the displayed image


def draw_shapes(
    width: int, height: int, seed: int, count: int = 3
) -> tuple[Image.Image, list[Shape]]:
    """Non-overlapping rectangles and circles on a white background, with their exact masks."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    shapes: list[Shape] = []
    tries = 0
    while len(shapes) < count and tries < 200:
        tries += 1
        w, h = rng.randint(width // 7, width // 3), rng.randint(height // 7, height // 3)
        x0, y0 = rng.randint(5, width - w - 5), rng.randint(5, height - h - 5)
        box = (x0, y0, x0 + w, y0 + h)
        if any(
            not (
                box[2] + 8 <= s.box[0]
                or s.box[2] + 8 <= box[0]
                or box[3] + 8 <= s.box[1]
                or s.box[3] + 8 <= box[1]
            )
            for s in shapes
        ):
            continue
        kind = rng.choice(["rectangle", "circle"])
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        shape_xy = (x0, y0, x0 + w - 1, y0 + h - 1)
        (draw.rectangle if kind == "rectangle" else draw.ellipse)(shape_xy, fill=255)
        image.paste(COLORS[len(shapes) % len(COLORS)], mask=layer)
        shapes.append(Shape(kind, box, np.asarray(layer) > 127))
    return image, shapes


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config like a user's file: local server, the given sections merged over defaults."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": "local", "model": "gemini-2.5-flash", "timeout": 20},
        "limits": {"concurrency": 4, "max_attempts": 4},
        "input": {"paths": [str(tmp_path / "images")]},
        "task": {"kind": "segment"},
        "output": {"dir": str(tmp_path / "out"), "flush_seconds": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "test-config.toml", tmp_path)


def read_rows(output_dir: Path) -> list[dict[str, Any]]:
    """Every committed row, in no particular order (readers see only *.parquet files)."""
    files = sorted(str(p) for p in Path(output_dir).glob("*.parquet"))
    if not files:
        return []
    return ds.dataset(files, format="parquet").to_table().to_pylist()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


# ------------------------------------------------------------------ a real S3 on loopback
@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """moto's S3 server on loopback, one for the whole session (starting it costs ~1 s), with
    the standard AWS environment pointing at it, as a user's would point at their endpoint."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def put_images(prefix: str, count: int, *, start: int = 0) -> list[str]:
    """`count` PNG scenes uploaded under `prefix` (an s3:// URL); their relative names."""
    from pipeline.output.stores import filesystem

    fs = filesystem("s3")
    names = []
    for n in range(start, start + count):
        buffer = io.BytesIO()
        draw_shapes(96, 96, seed=n, count=2)[0].save(buffer, "PNG")
        name = f"batch{n % 3}/img{n:03d}.png"
        fs.pipe(f"{prefix}/{name}", buffer.getvalue())
        names.append(name)
    return sorted(names)


_BUCKETS = iter(range(1_000_000))


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the session's S3 server: `s3://<name>`."""
    from pipeline.output.stores import filesystem

    name = f"test-bucket-{next(_BUCKETS)}"
    filesystem("s3").mkdir(name)
    return f"s3://{name}"
