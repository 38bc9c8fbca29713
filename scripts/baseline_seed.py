"""The guide's way, as a baseline: one blocking SDK call per image, parsed as the guide does.

This is the segmentation sample of Gemini's image-understanding guide (its generateContent
edition: https://ai.google.dev/gemini-api/docs/image-understanding) turned into a loop over a
folder, so the benchmark can say how much faster the pipeline is than what the guide teaches.
Per image: open it with Pillow, `thumbnail` to 1024 px, one synchronous
`client.models.generate_content` with thinking off, strip the ```json fence, `json.loads`, then
for each item: box to pixels with `int(value / 1000 * size)`, base64-decode the mask PNG, resize
it to the box (bilinear), threshold at 127. Two deliberate departures from the guide, both in the
baseline's favour and both stated in docs/benchmarks.md:

- the guide's `parse_json` strips the opening fence but returns the text *with* the closing fence
  (it assigns the trimmed text to an unused variable), so `json.loads` would fail on any fenced
  answer; here the trimmed text is returned;
- the guide draws an overlay with a per-pixel Python loop and saves PNGs; here the thresholded
  box masks are kept (bit-packed) and written once, with the boxes, to one Parquet file at the end.

    GEMINI_API_KEY=x python scripts/baseline_seed.py --base-url URL --input DIR --output OUT.parquet

Prints one JSON line on stdout: images, ok, errors, objects, seconds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from google import genai
from google.genai import types
from PIL import Image

PROMPT = (
    "Give the segmentation masks for all of the prominent items in the image. Output a JSON list "
    'of segmentation masks where each entry contains the 2D bounding box in the key "box_2d", the '
    'segmentation mask in key "mask", and the text label in the key "label". Use descriptive '
    "labels."
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_json(json_output: str) -> str:
    """The guide's fence stripping (with its return value fixed, see the module docstring)."""
    lines = json_output.splitlines()
    for i, line in enumerate(lines):
        if line == "```json":
            json_output = "\n".join(lines[i + 1 :])
            json_output = json_output.split("```")[0]
            break
    return json_output


def segment(client: genai.Client, model: str, image_path: Path) -> list[dict]:
    """One image, exactly the guide's steps up to the thresholded mask."""
    im = Image.open(image_path)
    im.thumbnail([1024, 1024], Image.Resampling.LANCZOS)
    config = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=0))
    response = client.models.generate_content(model=model, contents=[PROMPT, im], config=config)
    items = json.loads(parse_json(response.text))
    objects = []
    for item in items:
        box = item["box_2d"]
        y0 = int(box[0] / 1000 * im.size[1])
        x0 = int(box[1] / 1000 * im.size[0])
        y1 = int(box[2] / 1000 * im.size[1])
        x1 = int(box[3] / 1000 * im.size[0])
        if y0 >= y1 or x0 >= x1:
            continue
        png_str = item["mask"]
        if not png_str.startswith("data:image/png;base64,"):
            continue
        png_str = png_str.removeprefix("data:image/png;base64,")
        mask = Image.open(io.BytesIO(base64.b64decode(png_str)))
        mask = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        inside = np.array(mask) > 127
        objects.append(
            {
                "label": item["label"],
                "box_2d": [int(v) for v in box],
                "bbox": [float(x0), float(y0), float(x1), float(y1)],
                "mask_shape": list(inside.shape),
                "mask_bits": np.packbits(inside).tobytes(),
            }
        )
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", required=True, help="folder of images (walked recursively)")
    parser.add_argument("--output", required=True, help="Parquet file to write")
    parser.add_argument("--model", default="gemini-2.5-flash")
    parser.add_argument("--limit", type=int, help="at most this many images (in name order)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    paths = sorted(p for p in Path(args.input).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit is not None:
        paths = paths[: args.limit]
    client = genai.Client(
        api_key=os.environ["GEMINI_API_KEY"],
        http_options=types.HttpOptions(base_url=args.base_url, api_version="v1beta"),
    )
    rows, errors, n_objects = [], 0, 0
    for path in paths:
        try:
            objects = segment(client, args.model, path)
            rows.append({"path": str(path), "objects": objects, "error": None})
            n_objects += len(objects)
        except Exception as exc:  # the loop keeps going, like a user's try/except would
            errors += 1
            rows.append({"path": str(path), "objects": [], "error": f"{type(exc).__name__}: {exc}"})
    pq.write_table(pa.Table.from_pylist(rows), args.output, compression="zstd")
    seconds = time.perf_counter() - started
    summary = {
        "images": len(paths),
        "ok": len(paths) - errors,
        "errors": errors,
        "objects": n_objects,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(summary))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
