"""What a user would write instead of the pipeline: the official SDK's async client + a semaphore.

The straightforward fast script: every image of a folder through `client.aio.models
.generate_content` with an `asyncio.Semaphore` bounding the requests in flight, the answer parsed
by supervision's Gemini 2.5 parser (`sv.Detections.from_vlm(sv.VLM.GOOGLE_GEMINI_2_5, ...)`:
boxes in pixels, masks decoded, resized to their box, thresholded at 127, placed in the full
image), each mask stored as COCO compressed RLE with `sv.mask_to_rle`, and one Parquet file
written at the end. No rate limiting, no retries, no resume: what the pipeline adds on top.
`--task detect` asks the guide's detection prompt instead (boxes and labels, no masks).

`--max-side N` downscales the way the SDK's users do: the image opened with Pillow,
`Image.thumbnail((N, N))`, and the Pillow image handed to the SDK, which encodes it (a JPEG
opened from a file stays JPEG at its own quality, anything else becomes PNG). Nothing is rotated
by EXIF, as in the guide's samples. HEIC is read through pillow-heif when it is installed, as a
user sending phone photos would have it.

    GEMINI_API_KEY=x python scripts/baseline_sdk.py --base-url URL --input DIR --output OUT.parquet

Prints one JSON line on stdout: images, ok, errors, objects, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mimetypes
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google import genai
from google.genai import types
from PIL import Image

with contextlib.suppress(ImportError):  # phone photos: HEIC through pillow-heif, when installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    mimetypes.add_type("image/heic", ".heic")
    mimetypes.add_type("image/heif", ".heif")

with warnings.catch_warnings():  # supervision warns when opencv is absent; it has a numpy path
    warnings.simplefilter("ignore")
    import supervision as sv

SEGMENT_PROMPT = (
    "Give the segmentation masks for all of the prominent items in the image. Output a JSON list "
    'of segmentation masks where each entry contains the 2D bounding box in the key "box_2d", the '
    'segmentation mask in key "mask", and the text label in the key "label". Use descriptive '
    "labels."
)
DETECT_PROMPT = (
    "Detect all of the prominent items in the image. The box_2d should be [ymin, xmin, ymax, "
    "xmax] normalized to 0-1000."
)
PROMPTS = {"segment": SEGMENT_PROMPT, "detect": DETECT_PROMPT}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif")


def image_part(path: Path, max_side: int | None) -> tuple[Any, tuple[int, int]]:
    """What the SDK is given for one image, and the image's size: the file's bytes as they are,
    or a Pillow image thumbnailed to `max_side` (the SDK encodes it)."""
    image = Image.open(path)
    size = image.size
    if max_side is None:
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return types.Part.from_bytes(data=path.read_bytes(), mime_type=mime), size
    image.thumbnail((max_side, max_side))
    return image, size


async def segment_all(
    client: genai.Client,
    model: str,
    paths: list[Path],
    concurrency: int,
    *,
    prompt: str = SEGMENT_PROMPT,
    max_side: int | None = None,
) -> list[dict]:
    semaphore = asyncio.Semaphore(concurrency)
    config = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=0))

    async def one(path: Path) -> dict:
        async with semaphore:
            try:
                part, (width, height) = image_part(path, max_side)
                response = await client.aio.models.generate_content(
                    model=model, contents=[part, prompt], config=config
                )
                detections = sv.Detections.from_vlm(
                    sv.VLM.GOOGLE_GEMINI_2_5, response.text, resolution_wh=(width, height)
                )
            except Exception as exc:  # one bad image must not lose the others
                return {"path": str(path), "objects": [], "error": f"{type(exc).__name__}: {exc}"}
            masks = detections.mask
            objects = [
                {
                    "label": str(detections.data["class_name"][i]),
                    "bbox": [float(v) for v in detections.xyxy[i]],
                    "mask": None if masks is None else sv.mask_to_rle(masks[i], compressed=True),
                }
                for i in range(len(detections))
            ]
            return {"path": str(path), "width": width, "height": height, "objects": objects}

    return await asyncio.gather(*(one(path) for path in paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", required=True, help="folder of images (walked recursively)")
    parser.add_argument("--output", required=True, help="Parquet file to write")
    parser.add_argument("--model", default="gemini-2.5-flash")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit", type=int, help="at most this many images (in name order)")
    parser.add_argument("--task", choices=sorted(PROMPTS), default="segment")
    parser.add_argument("--max-side", type=int, help="thumbnail every image to this side first")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    paths = sorted(p for p in Path(args.input).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit is not None:
        paths = paths[: args.limit]
    client = genai.Client(
        api_key=os.environ["GEMINI_API_KEY"],
        http_options=types.HttpOptions(base_url=args.base_url, api_version="v1beta"),
    )
    rows = asyncio.run(
        segment_all(
            client,
            args.model,
            paths,
            args.concurrency,
            prompt=PROMPTS[args.task],
            max_side=args.max_side,
        )
    )
    pq.write_table(pa.Table.from_pylist(rows), args.output, compression="zstd")
    seconds = time.perf_counter() - started
    errors = sum(1 for row in rows if row.get("error"))
    summary = {
        "images": len(rows),
        "ok": len(rows) - errors,
        "errors": errors,
        "objects": sum(len(row["objects"]) for row in rows),
        "seconds": round(seconds, 3),
    }
    if errors:
        summary["first_error"] = next(row["error"] for row in rows if row.get("error"))
    print(json.dumps(summary))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
