"""A look at the dataset: per-image overlays (boxes, points, labels, translucent masks) and
index.html.

A group's row is shown as one figure per member, each with the objects placed in it (`image`)
and captioned with the group's name. Overlays are drawn at gallery size with numpy: masks are
decoded from their RLE, shrunk, and blended into the image in one vectorised step per image (the
guide's per-pixel loop is what not to do). Everything a model wrote (labels, text, reasons) is
data: file names come from a counter, every string in the page is HTML-escaped, and the page's
Content-Security-Policy runs no script but its own (pinned by hash) and loads nothing from
outside the gallery folder.
"""

from __future__ import annotations

import base64
import colorsys
import hashlib
import html
import io
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from pillow_heif import register_heif_opener

from pipeline.commands.compare import ImageResult, Report, compare_outputs
from pipeline.commands.exports.dataset import RootMap, label_of, views
from pipeline.inputs.fetch import Fetcher, FetchError, FetchSettings
from pipeline.locations import is_url
from pipeline.masks import rle_decode
from pipeline.output.fsutil import atomic_write_bytes
from pipeline.output.parts import Output, current_rows
from pipeline.records import SourceFile

MAX_SIDE = 1024  # overlays are for looking at: gallery size, not full resolution
MASK_ALPHA = 0.45
JPEG_QUALITY = 85
DRAWING_THREADS = 8  # Pillow releases the GIL while it decodes; remote reads overlap too
EAGER_IMAGES = 60  # later entries load lazily so a big gallery opens fast
LISTED_PROBLEMS = 1000  # error rows listed in the page; the counts cover them all
IMAGES_DIR = "images"
GALLERY_STATUSES = ("ok", "partial")
_OUR_IMAGE = re.compile(r"\d{6}\.jpg")
# the columns the gallery draws from (`pipeline compare --out` reads both outputs with them)
COLUMNS = (
    "image_root",
    "image_path",
    "task",
    "status",
    "error",
    "width",
    "height",
    "objects",
    "text",
    "labels",
    "model",
    "members",
)
# Marks each image loaded or broken once the page has loaded, so a gallery copied without its
# images folder says so (and a headless browser can check the page).
_SCRIPT = """addEventListener("load", () => {
  for (const img of document.images) {
    const broken = img.complete && img.naturalWidth === 0;
    img.dataset.state = broken ? "broken" : img.complete ? "loaded" : "pending";
    img.dataset.naturalWidth = img.naturalWidth;
    if (broken) img.closest("figure").classList.add("broken");
  }
  document.body.dataset.checked = "yes";
});"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:left;vertical-align:top}td.n{text-align:right}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:.4em;
vertical-align:-.1em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px}
figure img{width:100%;height:auto;display:block;background:#eee}
figure.missing{border-color:#c80}figure.broken{border-color:#c00}
figcaption{font-size:12px;word-break:break-all;margin-top:4px}
.note{color:#a40}.reason{white-space:pre-wrap;word-break:break-word;max-width:60em}
figure.disagree{border:2px solid #c33}figure.agree{border:2px solid #3a3}
.score{font-weight:bold}
"""
SIDE_GAP = 8  # pixels between A's overlay and B's in a comparison


@dataclass(slots=True)
class _Entry:
    number: int
    row: dict[str, Any]
    source: Path | str | None  # a local path, an object or URL (str); None: escapes its root
    other: dict[str, Any] | None = None  # --compare: the other output's view of this image
    mark: ImageResult | None = None  # --compare: how far the two answers agree


def render(
    output_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    limit: int | None = None,
    roots: RootMap | None = None,
    allow_hosts: tuple[str, ...] = (),
    compare: Output | Report | None = None,
) -> dict[str, Any]:
    """Draw overlays for the current ok/partial rows (at most `limit`) and write index.html.

    `compare` (another output of the same task, or the `Report` of comparing this one with it)
    shows each compared image with the other output's answer beside it, marked by agreement,
    worst first, then the images not compared. Given a Report (what `pipeline compare --out`
    passes), only the images that disagree are shown.

    Sources are read at image_root/image_path, the root being where `roots` says its images
    are now; a missing source gives a grey placeholder with the overlays, not a crash.
    Objects and URLs (a bucket's inputs, a manifest's URLs) are read through a `Fetcher`: its
    bounds, retries and caps, and no API key; internal addresses are refused as in a run
    unless their hosts are in `allow_hosts`.
    """
    register_heif_opener()
    rows, report, theirs = _read(output_dir, compare)  # first: nothing written on a refusal
    out = Path(out_dir)
    images_dir = _fresh_images_dir(out)
    roots = roots or RootMap()
    roots.check({row["image_root"] or "" for row in rows})
    problems = [row for row in rows if row["status"] not in GALLERY_STATUSES]
    shown = _shown(rows, report, theirs, disagreeing_only=isinstance(compare, Report))
    if limit is not None:
        shown = shown[: max(limit, 0)]
    entries = [
        _Entry(number, view, _source_path(view, roots), other, mark)
        for number, (view, other, mark) in enumerate(shown, start=1)
    ]
    found = _draw_all(entries, images_dir, FetchSettings(allow_hosts=allow_hosts))
    labels = Counter(
        label_of(obj)
        for row in rows
        if row["status"] in GALLERY_STATUSES
        for obj in row["objects"] or ()
    )
    statuses = Counter(row["status"] for row in rows)
    page = _page(Path(output_dir), entries, found, labels, statuses, problems, report)
    index = out / "index.html"
    atomic_write_bytes(index, page.encode("utf-8"))
    return {
        "index": str(index),
        "entries": len(entries),
        "missing_sources": found.count(False),
        "problems": len(problems),
        "labels": len(labels),
    }


Shown = tuple[dict[str, Any], dict[str, Any] | None, ImageResult | None]


Rows = list[dict[str, Any]]


def _fresh_images_dir(out: Path) -> Path:
    """The gallery's image folder, emptied of the images an earlier render drew (only files this
    module names: nothing else there is touched)."""
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.iterdir():
        if _OUR_IMAGE.fullmatch(stale.name):
            stale.unlink()
    return images_dir


def _draw_all(entries: list[_Entry], images_dir: Path, fetch: FetchSettings) -> list[bool]:
    """Each entry drawn, in threads (DRAWING_THREADS); for each, whether its source was found."""
    with Fetcher(fetch) as fetcher, ThreadPoolExecutor(max_workers=DRAWING_THREADS) as pool:
        return list(pool.map(lambda entry: _draw_entry(entry, images_dir, fetcher), entries))


def _read(output_dir: Output, compare: Output | Report | None) -> tuple[Rows, Report | None, Rows]:
    """This output's current rows and, with `compare`, the comparison and the other output's
    rows: each output read once (the comparison reads them with the gallery's columns, and
    keeps them; a Report made without them, from Python, is read again)."""
    if compare is None:
        return _current(output_dir), None, []
    if not isinstance(compare, Report):
        compare = compare_outputs(output_dir, compare, columns=COLUMNS)
    elif str(compare.a) != str(output_dir):  # its images, verdicts and held rows are A's
        raise ValueError(f"compare: a comparison of {compare.a}; render it from {compare.a}")
    if compare.holds(COLUMNS):
        return compare.read[0], compare, compare.read[1]
    return _current(output_dir), compare, _current(compare.b)


def _current(output: Output) -> Rows:
    return current_rows(output, COLUMNS).to_pylist()


def _shown(
    rows: Rows, report: Report | None, theirs_rows: Rows, *, disagreeing_only: bool
) -> list[Shown]:
    """The images to draw, each with the other output's view and the agreement (compared
    images first, worst first; then, unless only the disagreeing are wanted, the rest)."""
    answered = [row for row in rows if row["status"] in GALLERY_STATUSES]
    if report is None:
        return [(view, None, None) for row in answered for view in views(row)]
    mine = {_identity(row): row for row in answered if row["task"] == report.task}
    theirs = {_identity(r): r for r in theirs_rows}
    theirs = {key: row for key, row in theirs.items() if row["task"] == report.task}
    marked = [m for m in report.images if not disagreeing_only or m.score < 1]
    shown: list[Shown] = [
        (view, other, mark)
        for mark in marked
        for view, other in zip(
            views(mine[_identity(mark)]), views(theirs[_identity(mark)]), strict=False
        )
    ]
    if not disagreeing_only:
        compared = {_identity(mark) for mark in report.images}
        rest = [row for key, row in mine.items() if key not in compared]
        shown += [(view, None, None) for row in rest for view in views(row)]
    return shown


def _identity(row: dict[str, Any] | ImageResult) -> tuple[str, str]:
    if isinstance(row, ImageResult):
        return row.image_root, row.image_path
    return row["image_root"] or "", row["image_path"] or ""


def _source_path(row: dict[str, Any], roots: RootMap) -> Path | str | None:
    """root/image_path (a URL when the root is a bucket's; the root where `roots` says it is
    now), the URL itself for a URL input, None when image_path climbs out of its root."""
    root, path = roots.where(row["image_root"] or ""), row["image_path"] or ""
    if not root and is_url(path):
        return path
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    if is_url(root):
        return f"{root.rstrip('/')}/{relative}"
    return Path(root or ".") / relative


def _draw_entry(entry: _Entry, images_dir: Path, fetcher: Fetcher) -> bool:
    """Write the overlay of one row (and the other output's beside it); False when its source
    image could not be read."""
    image = _open_source(entry.source, fetcher)
    canvas = _overlay(entry, entry.row, image)
    if entry.other is not None:
        canvas = _side_by_side(canvas, _overlay(entry, entry.other, image))
    canvas.save(images_dir / f"{entry.number:06d}.jpg", quality=JPEG_QUALITY)
    return image is not None


def _overlay(entry: _Entry, row: dict[str, Any], image: Image.Image | None) -> Image.Image:
    """The row's objects drawn on its image at gallery size (a placeholder without it)."""
    width = row["width"] or (image.width if image else MAX_SIDE)
    height = row["height"] or (image.height if image else MAX_SIDE)
    scale = min(1.0, MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image is not None:
        canvas = image.resize(size, Image.Resampling.LANCZOS)
    else:
        why = "path outside its root" if entry.source is None else "source image not found"
        canvas = _placeholder(size, why)
    objects = row["objects"] or []
    canvas = _blend_masks(canvas, objects, width, height)
    _draw_boxes(canvas, objects, scale)
    _draw_points(canvas, objects, scale)
    return canvas


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """A's overlay and B's on one white canvas, A on the left."""
    width = left.width + SIDE_GAP + right.width
    both = Image.new("RGB", (width, max(left.height, right.height)), (255, 255, 255))
    both.paste(left, (0, 0))
    both.paste(right, (left.width + SIDE_GAP, 0))
    return both


def _open_source(source: Path | str | None, fetcher: Fetcher) -> Image.Image | None:
    """The source as displayed (EXIF orientation applied), RGB; None if it cannot be read."""
    if source is None:
        return None
    file: Path | io.BytesIO
    if isinstance(source, str):  # an object or a URL
        (read,) = fetcher.read_all([SourceFile(path=source, root="", rel_path=source)])
        if isinstance(read, FetchError):
            return None
        file = io.BytesIO(read)
    else:
        file = source
    try:
        with Image.open(file) as image:
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size when big
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _placeholder(size: tuple[int, int], why: str) -> Image.Image:
    """Grey, with the reason: the overlays still show where the objects were."""
    canvas = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(canvas).text((8, 8), why, font=_font(size), fill=(255, 255, 255))
    return canvas


def _font(size: tuple[int, int]) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """About 12 px once the gallery shows the overlay ~360 px wide."""
    return ImageFont.load_default(size=max(10, round(max(size) / 26)))


def _blend_masks(
    canvas: Image.Image, objects: list[dict[str, Any]], width: int, height: int
) -> Image.Image:
    """All masks at once: a per-pixel object index, then one blend with a colour table."""
    owner = np.zeros((canvas.height, canvas.width), dtype=np.uint16)
    colours = [(0, 0, 0)]
    for obj in objects:
        mask = obj.get("mask")
        if not mask or mask.get("counts") is None or len(colours) > 65_000:
            continue
        try:
            full = rle_decode(mask)
        except (ValueError, KeyError, TypeError):
            continue  # a corrupt mask is shown as its box only
        if full.shape != (height, width) or not full.any():
            continue
        small = Image.fromarray(full).resize(canvas.size, Image.Resampling.NEAREST)
        owner[np.asarray(small, dtype=bool)] = len(colours)
        colours.append(_colour(label_of(obj)))
    if len(colours) == 1:
        return canvas
    pixels = np.asarray(canvas, dtype=np.float32)
    inside = owner > 0
    table = np.asarray(colours, dtype=np.float32)
    pixels[inside] = pixels[inside] * (1 - MASK_ALPHA) + table[owner[inside]] * MASK_ALPHA
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _draw_boxes(canvas: Image.Image, objects: list[dict[str, Any]], scale: float) -> None:
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 250))
    font = _font(canvas.size)
    for obj in objects:
        bbox = obj.get("bbox")
        if not bbox or len(bbox) != 4:
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in bbox)
        if x1 < x0 or y1 < y0:
            continue
        colour = _colour(label_of(obj))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = label_of(obj)[:40]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        # Above the box when there is room (else inside it), and kept inside the image.
        x = max(0.0, min(x0, canvas.width - (right - left) - 2))
        y = max(0.0, y0 - (bottom - top) - 4)
        draw.rectangle((x + left - 2, y + top - 2, x + right + 2, y + bottom + 2), fill=colour)
        draw.text((x, y), text, font=font, fill=_ink(colour))


def _draw_points(canvas: Image.Image, objects: list[dict[str, Any]], scale: float) -> None:
    """A dot in the label's colour, ringed in white, and the label beside it."""
    draw = ImageDraw.Draw(canvas)
    radius = max(4, round(max(canvas.size) / 64))
    font = _font(canvas.size)
    for obj in objects:
        xy = obj.get("xy")
        if not xy or len(xy) != 2:
            continue
        x, y = (float(v) * scale for v in xy)
        colour = _colour(label_of(obj))
        ring = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(ring, fill=colour, outline=(255, 255, 255), width=max(1, radius // 3))
        text = label_of(obj)[:40]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx = max(0.0, min(x + radius + 4, canvas.width - (right - left) - 2))
        ty = max(0.0, min(y - (bottom - top) / 2, canvas.height - (bottom - top) - 2))
        draw.rectangle((tx + left - 2, ty + top - 2, tx + right + 2, ty + bottom + 2), fill=colour)
        draw.text((tx, ty), text, font=font, fill=_ink(colour))


def _colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated colour per label (the same in every image and every run)."""
    digest = hashlib.blake2b(label.encode("utf-8", "surrogateescape"), digest_size=2).digest()
    hue = int.from_bytes(digest, "big") / 65536
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `colour`."""
    red, green, blue = colour
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


# -------------------------------------------------------------------------------------- page
def _page(
    output_dir: Path,
    entries: list[_Entry],
    found: list[bool],
    labels: Counter[str],
    statuses: Counter[str],
    problems: list[dict[str, Any]],
    report: Report | None = None,
) -> str:
    esc = html.escape
    title = f"Gallery of {output_dir.name or output_dir}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(entries):,} images shown of {sum(statuses.values()):,} current rows.</p>",
        *_comparison(report),
        '<h2>Status</h2><table id="status"><tr><th>status</th><th>rows</th></tr>',
    ]
    parts += [
        f'<tr><td>{esc(name)}</td><td class="n">{count:,}</td></tr>'
        for name, count in sorted(statuses.items())
    ]
    parts.append("</table><h2>Labels</h2>")
    parts.append('<table id="labels"><tr><th>label</th><th>objects</th></tr>')
    parts += [
        f'<tr><td><span class="swatch" style="background:{_css(_colour(name))}"></span>'
        f'{esc(name)}</td><td class="n">{count:,}</td></tr>'
        for name, count in sorted(labels.items(), key=lambda item: (-item[1], item[0]))
    ]
    parts.append('</table><h2>Images</h2><div class="gallery" id="gallery">')
    for entry, has_source in zip(entries, found, strict=True):
        parts.append(_figure(entry, has_source))
    parts.append("</div>")
    parts.append(f"<h2>Errors and blocked answers</h2><p>{len(problems):,} rows.</p>")
    if problems:
        parts.append(
            '<table id="problems"><tr><th>image</th><th>task</th><th>status</th>'
            "<th>reason</th></tr>"
        )
        for row in problems[:LISTED_PROBLEMS]:
            parts.append(
                f"<tr><td>{esc(row['image_path'] or '')}</td><td>{esc(row['task'] or '')}</td>"
                f"<td>{esc(row['status'] or '')}</td>"
                f'<td class="reason">{esc(_clip(row["error"] or "", 2000))}</td></tr>'
            )
        parts.append("</table>")
        if len(problems) > LISTED_PROBLEMS:
            parts.append(f"<p>{len(problems) - LISTED_PROBLEMS:,} more not listed.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _comparison(report: Report | None) -> list[str]:
    """What the marks mean, when the gallery compares two outputs."""
    if report is None:
        return []
    agreement = report.agreement
    overall = "n/a" if agreement is None else f"{agreement:.3f}"
    return [
        f'<p id="comparison">Compared with {html.escape(report.b)} ({html.escape(report.task)}): '
        f"agreement {overall} over {len(report.images):,} images. Each image shows this "
        "output's answer on the left and the other's on the right, the least agreeing first "
        "(see <code>pipeline compare</code>).</p>"
    ]


def _marks(entry: _Entry) -> tuple[str, list[str]]:
    """The figure's class and caption lines for a compared image (none otherwise)."""
    if entry.mark is None or entry.other is None:
        return "", []
    esc, other = html.escape, entry.other
    kind = "agree" if entry.mark.score >= 1 else "disagree"
    lines = [f'<span class="score">agreement {entry.mark.score:.3f}</span> ({kind}s)']
    lines.append(f"right: {len(other['objects'] or [])} objects")
    slips = entry.mark.detail.get("label_slips") or []
    if slips:
        shown = "; ".join(f"{esc(left)} / {esc(right)}" for left, right in slips[:5])
        lines.append(f"labels differ (left / right): {shown}")
    if other["labels"]:
        lines.append("right labels: " + esc(", ".join(other["labels"])))
    if other["text"]:
        lines.append("right: " + esc(_clip(other["text"], 500)))
    return kind, lines


def _figure(entry: _Entry, has_source: bool) -> str:
    esc = html.escape
    row = entry.row
    objects = row["objects"] or []
    name = f"{IMAGES_DIR}/{entry.number:06d}.jpg"
    lazy = ' loading="lazy"' if entry.number > EAGER_IMAGES else ""
    caption = [
        f"<b>{esc(row['image_path'] or '')}</b>",
        f"{esc(row['task'] or '')} · {esc(row['status'] or '')} · "
        f"{len(objects)} object{'' if len(objects) == 1 else 's'}",
    ]
    if row.get("group"):
        # not `name`: that is the overlay's file, which the <img> below must still point at
        group, index, count = row["group"]
        caption.append(f"group {esc(group or '')}: image {index} of {count} (0 first)")
    if not has_source:
        why = "path outside its root" if entry.source is None else "source image not found"
        caption.append(f'<span class="note">{why}</span>')
    if row["status"] == "partial" and row["error"]:
        caption.append(f'<span class="note">{esc(_clip(row["error"], 300))}</span>')
    if row["labels"]:
        caption.append("labels: " + esc(", ".join(row["labels"])))
    if row["text"]:
        caption.append(esc(_clip(row["text"], 500)))
    kind, marks = _marks(entry)
    caption += marks
    classes = " ".join(c for c in (kind, "" if has_source else "missing") if c)
    attributes = f' class="{classes}"' if classes else ""
    if entry.mark is not None:
        attributes += f' data-score="{entry.mark.score:.4f}"'
    alt = esc(f"{row['image_path'] or ''} ({row['task'] or ''})")
    return (
        f'<figure{attributes} id="e{entry.number}"><a href="{name}">'
        f'<img src="{name}" alt="{alt}"{lazy}></a>'
        f"<figcaption>{'<br>'.join(caption)}</figcaption></figure>"
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _css(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)
