"""Regenerate the bundled sample images in data/samples and their ground truth.

Flat shapes on plain backgrounds have exact answers, so the demo doubles as an end-to-end check
of the pipeline's geometry against the local server. Seeded: the same files every time.

    python scripts/make_samples.py [--out data/samples]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pillow_heif
from PIL import Image, ImageDraw

pillow_heif.register_heif_opener()

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
}
BACKGROUNDS = [(255, 255, 255), (245, 240, 230), (30, 30, 30), (200, 220, 235)]
EXIF_ORIENTATION = 0x0112


def draw_scene(rng: random.Random, width: int, height: int) -> tuple[Image.Image, list[dict]]:
    """Two to four non-overlapping shapes; returns the image and each shape's truth."""
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    shapes: list[dict] = []
    for _ in range(50):
        if len(shapes) >= rng.randint(2, 4):
            break
        w, h = rng.randint(width // 8, width // 3), rng.randint(height // 8, height // 3)
        x0, y0 = rng.randint(8, width - w - 8), rng.randint(8, height - h - 8)
        box = (x0, y0, x0 + w, y0 + h)
        if any(_overlap(box, s["bbox"], 10) for s in shapes):
            continue
        color = rng.choice([c for c in COLORS if c not in {s["color"] for s in shapes}])
        kind = rng.choice(["rectangle", "circle", "triangle"])
        if kind == "rectangle":
            draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=COLORS[color])
        elif kind == "circle":
            draw.ellipse((x0, y0, x0 + w - 1, y0 + h - 1), fill=COLORS[color])
        else:
            draw.polygon(
                [(x0 + w / 2, y0), (x0 + w - 1, y0 + h - 1), (x0, y0 + h - 1)], fill=COLORS[color]
            )
        shapes.append({"label": f"{color} {kind}", "color": color, "shape": kind, "bbox": box})
    return image, shapes


def _overlap(a: tuple, b: tuple, margin: int) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "data" / "samples"))
    args = parser.parse_args()
    out = Path(args.out)
    (out / "more").mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261123)
    truth = {}
    plan = [
        ("shapes-01.png", 384, 384, "PNG"),
        ("shapes-02.jpg", 640, 480, "JPEG"),
        ("shapes-03.webp", 512, 384, "WEBP"),
        ("shapes-04.png", 960, 540, "PNG"),
        ("shapes-05.jpg", 800, 600, "JPEG"),
        ("more/shapes-06.png", 300, 420, "PNG"),
        ("more/shapes-07.gif", 320, 240, "GIF"),
        ("more/shapes-08.jpg", 600, 400, "JPEG-ROTATED"),
        ("more/shapes-09.heic", 448, 336, "HEIF"),
    ]
    for name, width, height, fmt in plan:
        image, shapes = draw_scene(rng, width, height)
        path = out / name
        if fmt == "JPEG-ROTATED":
            # Stored rotated 90 degrees with EXIF orientation 6: displayed as drawn.
            stored = image.transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            stored.save(path, "JPEG", quality=92, exif=exif.tobytes())
        elif fmt == "GIF":
            image.convert("P", palette=Image.Palette.ADAPTIVE).save(path, "GIF")
        else:
            quality = {"quality": 92} if fmt in ("JPEG", "WEBP", "HEIF") else {}
            image.save(path, fmt, **quality)
        truth[name] = {"width": width, "height": height, "shapes": shapes}
    # The same bytes at a second path: one API call, two rows.
    (out / "more" / "copy-of-shapes-01.png").write_bytes((out / "shapes-01.png").read_bytes())
    truth["more/copy-of-shapes-01.png"] = truth["shapes-01.png"]
    (out.parent / "samples-truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(f"wrote {len(plan)} images to {out}")


if __name__ == "__main__":
    main()
