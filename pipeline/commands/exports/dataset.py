"""What every export reads: the current rows of an output as images, each with a unique name.

Rows are read only through `current_rows` (the output's layout is not this module's business).
The current `ok` and `partial` rows are kept (`task` keeps one task's rows); a group's row gives
one image per member, holding the objects whose `image` names that member. Rows of several
tasks about one file meet in one `ExportImage`: its objects, its captions (caption rows' text)
and its labels (classify rows').

Names: a file is found again at its root joined with its `image_path`, and named by that
location relative to the common parent of every image's root, folders kept (`name`), so
`cam1/frame.jpg` and `cam2/frame.jpg` under two roots stay two files; formats that want one
flat folder get `file`, the name with its folders folded in and made unique by its stem (a
YOLO label file shares its image's stem, so `frame.jpg` and `frame.png` must not meet).
Names come only from the files' own paths, never from model text.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pipeline.commands.exports.errors import ExportError
from pipeline.locations import scheme_of
from pipeline.output.parts import Output, current_rows

EXPORTED_STATUSES = ("ok", "partial")
COLUMNS = (
    "image_root",
    "image_path",
    "width",
    "height",
    "task",
    "status",
    "objects",
    "text",
    "labels",
    "members",
)
UNLABELLED = "unlabelled"
# The tasks that locate things: their rows are about objects even when they found none (an
# image with an empty list is a true negative); other rows hold an empty list, not an answer.
OBJECT_TASKS = ("detect", "segment", "point")
MAX_FILE_NAME = 200  # bytes-ish: most filesystems stop at 255, and a suffix may be added
_UNSAFE = re.compile(r"[^\w.\-]+")  # anything else in a flat file name becomes "_"


class UnknownRoot(ExportError):
    """`--images-root ROOT=DIR` names a ROOT no exported row has."""


@dataclass(frozen=True, slots=True)
class RootMap:
    """Where each root's images are now (`--images-root`): ROOT=DIR moves one root; a bare DIR
    moves every root (what a single root's output always meant)."""

    moved: tuple[tuple[str, str], ...] = ()
    everything: str | None = None

    @classmethod
    def parse(cls, values: Sequence[str] | str | None) -> RootMap:
        """`["/data/cam1=/mnt/cam1", ...]` or one bare DIR; split at the first "=" (a ROOT
        with "=" in it cannot be named, a DIR can)."""
        if values is None:
            return cls()
        listed = [values] if isinstance(values, str) else list(values)
        pairs = [tuple(value.split("=", 1)) for value in listed if "=" in value]
        bare = [value for value in listed if "=" not in value]
        if len(bare) > 1:
            raise ExportError(f"one bare --images-root DIR at most, got {bare}; use ROOT=DIR")
        moved = tuple((_trimmed(root), _trimmed(where)) for root, where in pairs)
        return cls(moved, bare[0] if bare else None)

    def where(self, root: str) -> str:
        """Where the images of `root` are now; a URL input has no root ("") and stays."""
        if not root:
            return root
        return dict(self.moved).get(_trimmed(root), self.everything or root)

    def check(self, roots: Iterable[str]) -> None:
        """Every ROOT named must be a root of the rows: a typo would silently move nothing."""
        known = {_trimmed(root) for root in roots}
        unknown = [root for root, _ in self.moved if root not in known]
        if unknown:
            raise UnknownRoot(
                f"--images-root names {unknown}, not roots of the rows: {sorted(known)}"
            )


def _trimmed(root: str) -> str:
    return root.rstrip("/") or root


@dataclass(slots=True)
class ExportImage:
    """One image file of the export and everything the exported rows say about it."""

    root: str  # as the rows name it
    path: str  # image_path, relative to root
    source: str  # where the file is now: its (moved) root joined with path; local or a URL
    folder: tuple[str, ...]  # the segments of its root where it is now
    width: int
    height: int
    name: str = ""  # relative to `Exported.parent`, folders kept; unique
    file: str = ""  # one flat file name, unique by stem (case-insensitively)
    objects: list[dict[str, Any]] | None = None  # None: no row of it holds objects
    captions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows (members' views) read


@dataclass(slots=True)
class Exported:
    images: list[ExportImage]
    parent: str  # the common parent of the images' roots (where they are now)
    roots: dict[str, str]  # each root of the rows -> where its images are now (URLs: none)
    skipped: Counter[str]  # why rows or images were left out -> how many


def collect(
    output: Output,
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    columns: Sequence[str] = COLUMNS,
) -> Exported:
    """The images of the current exported rows, named; `columns` (COLUMNS and more) are kept
    in each image's `rows`."""
    rows = current_rows(output, _with_base(columns)).to_pylist()
    gathering = _Gathering(roots or RootMap())
    for row in rows:
        if task is not None and row["task"] != task:
            continue
        if row["status"] not in EXPORTED_STATUSES:
            gathering.skipped[f"rows with status {row['status']}"] += 1
            continue
        for view in views(row):
            gathering.add(view)
    gathering.roots.check(gathering.seen_roots)
    images = list(gathering.found.values())
    parent = _name_all(images)
    roots_now = {root: where for root, where in gathering.seen_roots.items() if root}
    return Exported(images, _joined(parent), roots_now, gathering.skipped)


def _with_base(columns: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*COLUMNS, *columns]))


def views(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The images a row is about: the row itself, or each member of a group's row as a row of
    its own (the member's path, root and size, the objects placed in it) that still names its
    group in `group`: (group name, member index, member count)."""
    members = row.get("members")
    if not members:
        return [row]
    objects = row["objects"]
    return [
        {
            **row,
            "image_root": member["image_root"],
            "image_path": member["image_path"],
            "width": member["width"],
            "height": member["height"],
            "objects": None if objects is None else [o for o in objects if o.get("image") == i],
            "group": (row["image_path"], i, len(members)),
        }
        for i, member in enumerate(members)
    ]


@dataclass(slots=True)
class _Gathering:
    """The images found so far, by where their file is now (rows of several tasks about one
    file meet there), and what was left out."""

    roots: RootMap
    found: dict[str, ExportImage] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    seen_roots: dict[str, str] = field(default_factory=dict)

    def add(self, view: dict[str, Any]) -> None:
        root, path = view["image_root"] or "", view["image_path"] or ""
        reason = _unplaceable(path, view)
        if reason:
            self.skipped[reason] += 1
            return
        where = self.seen_roots.setdefault(root, self.roots.where(root))
        source = _joined(_parts(_join(where, path)))
        image = self.found.get(source)
        if image is None:
            size = int(view["width"]), int(view["height"])
            image = ExportImage(root, path, source, _folder(where, path), *size)
            self.found[source] = image
        _gather(image, view)


def _unplaceable(path: str, view: dict[str, Any]) -> str | None:
    """Why an image cannot be exported, or None."""
    relative = PurePosixPath(path)
    if not path or (relative.is_absolute() and view["image_root"]) or ".." in relative.parts:
        return "images whose path leaves its root"
    if not view["width"] or not view["height"]:
        return "images without a known size"
    return None


def _gather(image: ExportImage, view: dict[str, Any]) -> None:
    image.rows.append(view)
    if has_objects(view):
        image.objects = [*(image.objects or []), *view["objects"]]
    if is_caption(view):
        image.captions.append(view["text"])
    if view["task"] == "classify" and view["labels"]:
        image.labels.extend(view["labels"])


def has_objects(row: dict[str, Any]) -> bool:
    """Whether a row's answer is its objects (see OBJECT_TASKS)."""
    objects = row["objects"]
    return objects is not None and (row["task"] in OBJECT_TASKS or bool(objects))


def is_caption(row: dict[str, Any]) -> bool:
    return row["task"] == "caption" and bool(row["text"])


def count_unused(
    exported: Exported, used: Callable[[dict[str, Any]], bool], format_name: str
) -> None:
    """Count the rows read whose answer a format has no place for, by task, as skipped: what
    an export leaves out is said, never dropped silently."""
    for image in exported.images:
        for row in image.rows:
            if not used(row):
                exported.skipped[f"{row['task']} rows ({format_name} has no place for them)"] += 1


def with_objects(exported: Exported, format_name: str) -> list[ExportImage]:
    """The images that rows with objects are about, for formats of objects only (the other
    rows are counted as skipped)."""
    count_unused(exported, has_objects, format_name)
    return [image for image in exported.images if image.objects is not None]


def label_of(obj: dict[str, Any]) -> str:
    return obj.get("label") or UNLABELLED


# -------------------------------------------------------------------------------- naming
def _join(root: str, path: str) -> str:
    return f"{root.rstrip('/')}/{path}" if root else path


def _parts(location: str) -> tuple[str, ...]:
    """A location as segments: a URL's "scheme://" and host first, a local path's "/" first."""
    scheme = scheme_of(location)
    if scheme is None:
        return PurePosixPath(location).parts
    rest = location.split("://", 1)[1]
    return (f"{scheme}://", *(part for part in rest.split("/") if part))


def _joined(parts: Sequence[str]) -> str:
    if not parts:
        return ""
    if parts[0].endswith("://"):
        return parts[0] + "/".join(parts[1:])
    return str(PurePosixPath(*parts))


def _folder(root: str, path: str) -> tuple[str, ...]:
    """The segments of the folder an image is named relative to: its root where it is now
    (its own folder for an input given as a URL or an absolute path, which has no root)."""
    return _parts(root) if root else _parts(path)[:-1]


def _name_all(images: list[ExportImage]) -> tuple[str, ...]:
    """Name every image relative to the common parent of their folders; flat names too.
    Returns that parent's segments."""
    parent = _common_prefix([image.folder for image in images])
    taken: set[str] = set()
    for image in images:
        image.name = _relative(_parts(image.source)[len(parent) :])
        image.file = _unique(_flat(image.name), taken)
    return tuple(parent)


def _common_prefix(folders: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The segments every folder starts with (segments, not characters: /data/cam is no
    parent of /data/cam1)."""
    if not folders:
        return ()
    shortest = min(folders, key=len)
    for depth, part in enumerate(shortest):
        if any(folder[depth] != part for folder in folders):
            return shortest[:depth]
    return shortest


def _relative(parts: Sequence[str]) -> str:
    """Segments below the parent as a relative name. With no common parent at all (roots on
    two buckets, or a URL input beside a folder) a URL's scheme becomes a folder of its own
    and an absolute path loses its leading "/"."""
    return "/".join(part.removesuffix("://") for part in parts if part != "/")


def _flat(name: str) -> str:
    """A relative name as one safe file name: folders folded in with "__", anything but
    letters, digits, ".", "-" and "_" made "_", no leading dot (no hidden files); the end is
    kept when it is too long (the file's own name and its extension)."""
    flat = _UNSAFE.sub("_", name.replace("/", "__")).lstrip(".") or "image"
    return flat[-MAX_FILE_NAME:]


def _unique(flat: str, taken: set[str]) -> str:
    """`flat`, or `stem-N.ext` with the first N whose stem is not taken (case-insensitively:
    macOS and Windows filesystems would make two such files one)."""
    stem, suffix = os.path.splitext(flat)
    candidate, number = flat, 1
    while os.path.splitext(candidate)[0].casefold() in taken:
        number += 1
        candidate = f"{stem}-{number}{suffix}"
    taken.add(os.path.splitext(candidate)[0].casefold())
    return candidate


# ------------------------------------------------------------------------------- summary
@dataclass(slots=True)
class Summary:
    """What an export wrote and left out: `as_dict()` for `--json`, `line()` for people."""

    format: str
    wrote: list[str]
    counts: dict[str, int]
    skipped: Counter[str]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "wrote": self.wrote,
            **self.counts,
            "skipped": dict(sorted(self.skipped.items())),
            "notes": self.notes,
        }

    def line(self) -> str:
        counts = ", ".join(f"{n:,} {what.replace('_', ' ')}" for what, n in self.counts.items())
        text = f"export {self.format}: wrote {', '.join(self.wrote)} ({counts})"
        if self.skipped:
            text += "; skipped " + ", ".join(
                f"{n:,} {why}" for why, n in sorted(self.skipped.items())
            )
        return "; ".join([text, *self.notes])
