"""A Hugging Face `datasets` image folder from the current rows.

`OUT/images/` holds the images (symlinks or copies, one flat folder) and `OUT/metadata.parquet`
one row per image, which `datasets.load_dataset("imagefolder", data_dir=OUT)` (or
`load_dataset(OUT)`) joins to its file by `file_name`, giving an `image` column of the `Image`
feature. Parquet rather than JSON lines: every column keeps its Arrow type, so the objects'
struct (label, box_2d, bbox, mask as COCO RLE, point), and any typed column the rows carry
(a custom task's answer), arrive as they are in the output, not as JSON's guesses.

Columns: `file_name`, `name` (the path relative to the roots' common parent), `image_root`
and `image_path` (as the rows name them), `width`, `height`, `tasks` (the tasks whose rows
are about the image), `objects` (every row's, concatenated), `captions` (caption rows' text),
`labels` (classify rows'), then each other answer column of the rows (`text`, `json`, `model`,
...), the first non-null of the image's rows, in the rows' own type. Bookkeeping columns
(tokens, timings, keys, raw answers) are left out.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commands.exports.dataset import COLUMNS, ExportImage, RootMap, Summary, collect
from pipeline.commands.exports.files import place_images, staged_folder
from pipeline.output.parts import Output
from pipeline.records import OBJECT_TYPE, ROW_SCHEMA, USAGE_COLUMNS

IMAGES_DIR = "images"
METADATA = "metadata.parquet"
# What a run spent and how, not what was seen: not part of a dataset.
BOOKKEEPING = frozenset(
    {
        "key",
        "file_size",
        "file_mtime_ns",
        "mime_type",
        "retryable",
        "finish_reason",
        "raw_response",
        "est_image_tokens",
        "est_prompt_tokens",
        "latency_ms",
        "attempts",
        "input_mode",
        "run_id",
        "completed_at",
        *USAGE_COLUMNS,
    }
)
_OWN = pa.schema(
    [
        ("file_name", pa.string()),
        ("name", pa.string()),
        ("image_root", pa.string()),
        ("image_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("tasks", pa.list_(pa.string())),
        ("objects", pa.list_(OBJECT_TYPE)),
        ("captions", pa.list_(pa.string())),
        ("labels", pa.list_(pa.string())),
    ]
)


def export_hf(
    output_dir: Output,
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    copy: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> Summary:
    """Write the image folder (whole: staged, then swapped in for `out_dir`)."""
    extra = [f.name for f in ROW_SCHEMA if f.name not in BOOKKEEPING and f.name not in COLUMNS]
    exported = collect(output_dir, task=task, roots=roots, columns=extra)
    summary = Summary("hf", [str(out_dir)], {}, exported.skipped)
    with staged_folder(out_dir, "hf") as stage:
        placed, missing = place_images(
            exported.images, stage / IMAGES_DIR, copy=copy, allow_hosts=allow_hosts
        )
        summary.skipped.update(missing)
        pq.write_table(_table(placed, extra), stage / METADATA)
    summary.counts.update(
        images=len(placed),
        objects=sum(len(image.objects or ()) for image in placed),
        captions=sum(len(image.captions) for image in placed),
    )
    return summary


def _table(images: list[ExportImage], extra: list[str]) -> pa.Table:
    schema = pa.schema([*_OWN, *(ROW_SCHEMA.field(name) for name in extra)])
    records = [_record(image, extra) for image in images]
    return pa.Table.from_pylist(records, schema=schema)


def _record(image: ExportImage, extra: list[str]) -> dict[str, Any]:
    record = {
        "file_name": f"{IMAGES_DIR}/{image.file}",
        "name": image.name,
        "image_root": image.root,
        "image_path": image.path,
        "width": image.width,
        "height": image.height,
        "tasks": [row["task"] for row in image.rows],
        "objects": image.objects or [],
        "captions": image.captions,
        "labels": image.labels,
    }
    for column in extra:
        record[column] = next((row[column] for row in image.rows if row[column] is not None), None)
    return record
