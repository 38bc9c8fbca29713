"""Find the files to work on: a lazy, deterministic, depth-first walk, or a manifest.

Roots may be local folders or object-store prefixes (`s3://`, `gs://`, `az://`, `file://`,
through fsspec; see `walk_objects`), and manifest entries may be paths, object URLs or
`http(s)://` URLs. An object's or a URL's identity for resume is its size and a version stamp
(`version_stamp`: of its ETag or generation, or for a URL its ETag or Last-Modified) in place of
an mtime, so a rerun skips what is done from a listing, without downloading anything.

Both yield `SourceFile`s and never raise for a bad entry: a broken link, a symlink loop or an
unreadable directory becomes a `SourceFile` with `error` set, so it becomes an error row instead
of silently vanishing or stopping the run.

Patterns (`include` / `exclude`) are globs matched against `rel_path` (POSIX, relative to the root):

- `*`, `?` and `[...]` match within one path component; `**` as a whole component matches zero or
  more components. Matching ignores case, so `*.jpg` also takes `IMG_0001.JPG`.
- A pattern without `/` matches the file name at any depth (`*.png` is `**/*.png`); a pattern with
  `/` is anchored at the root (`raw/**/*.tif`).
- Hidden entries (names starting with `.`) are skipped, like the shell does: no wildcard, `**`
  included, matches a leading dot. An include pattern names hidden entries by writing the dot in
  that component: `.thumbs/*.jpg`, `**/.*.png`, `.*`. Excludes match hidden names freely.
- An exclude matching a directory prunes the whole subtree; include patterns prune directories no
  file under which could match them (`photos/*` never walks `videos/`).
- A root that is a file is always yielded (the user named it), whatever the patterns say.

Names are str as os.scandir gives them: on Linux a non-UTF-8 name carries lone surrogates
(surrogateescape), so it opens again as it was found; encode with "surrogateescape" (or replace)
before writing it where only UTF-8 goes.

Symlinks: a link to a file is always followed (its `path` stays the link's); a link to a
directory only with `follow_symlinks` (a root is always followed: the user named it). A directory
already on the current path (a loop through a link or a bind mount) becomes one error entry, so
does a linked directory already walked through another link (walking it again could blow up
exponentially on link-heavy trees). Real directories are always walked.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import hashlib
import io
import itertools
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from pipeline import exits, locations
from pipeline.config import InputConfig
from pipeline.gemini.types import MAX_IMAGES_PER_REQUEST
from pipeline.output import stores
from pipeline.output.index import GrowingDigestSet
from pipeline.records import SourceFile, SourceGroup, Work

_GLOBSTAR = None  # a `**` component in a compiled pattern
_PARQUET_BATCH_ROWS = 8192
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_PATH_COLUMNS = ("path", "image_path")  # image_path: a pipeline output can be a manifest
S3_PAGE = 1000  # keys per ListObjectsV2 page (S3's maximum)
RESOLVE_TOGETHER = 64  # manifest URLs and objects whose size and version are asked at once
Resolver = Callable[[list[SourceFile]], None]
Listed = tuple[str, int, str, str]  # an object listed: (key under the prefix, size, version,
# content id: `stores.content_id`)


def version_stamp(token: object) -> int:
    """A 63-bit number standing for an object's version (ETag, generation, Last-Modified):
    what `file_mtime_ns` holds for an object or a URL, so the resume rule compares it exactly
    as it compares a local file's mtime. 0 stays 0 (nothing known)."""
    text = str(token or "").strip().strip('"')
    if not text:
        return 0
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1


class _Glob:
    """One pattern as a tiny automaton over path components, so a walk can carry its state down
    the tree and test each entry with one step instead of re-matching the whole path."""

    def __init__(self, pattern: str, *, dot_rule: bool) -> None:
        text = pattern.strip()
        while text.startswith("./"):
            text = text[2:]
        text = text.strip("/")
        if not text:
            raise ValueError(f"empty glob pattern: {pattern!r}")
        parts = text.split("/") if "/" in text else ["**", text]
        self.pattern = pattern
        self.dot_rule = dot_rule
        self.parts: list[re.Pattern[str] | None] = []
        self.literal_dot: list[bool] = []
        for part in parts:
            if part == "**":
                self.parts.append(_GLOBSTAR)
            else:
                self.parts.append(re.compile(fnmatch.translate(part), re.IGNORECASE))
            self.literal_dot.append(part.startswith("."))

    @classmethod
    def any_of(cls, names: Sequence[str]) -> _Glob:
        """One automaton for several patterns of a file name alone (`*.png`, `*.jpg`, ...: the
        default include has 19): one regex alternation per entry instead of 19 automata
        stepped (0.14 ms of client CPU an image, measured with `bench.py profile`)."""
        glob = cls(names[0], dot_rule=True)
        either = "|".join(f"(?:{fnmatch.translate(name.strip())})" for name in names)
        glob.parts[-1] = re.compile(either, re.IGNORECASE)
        glob.pattern = " ".join(names)
        return glob

    def start(self) -> frozenset[int]:
        return self._closure({0})

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        """States after consuming one more path component `name`."""
        hidden = self.dot_rule and name.startswith(".")
        reached: set[int] = set()
        for index in states:
            if index == len(self.parts):
                continue
            part = self.parts[index]
            if part is _GLOBSTAR:
                if not hidden:
                    reached.add(index)
            elif (not hidden or self.literal_dot[index]) and part.match(name):
                reached.add(index + 1)
        return self._closure(reached)

    def accepts(self, states: frozenset[int]) -> bool:
        return len(self.parts) in states

    def may_match_below(self, states: frozenset[int]) -> bool:
        """Whether some path below the directory these states describe could still match."""
        return any(index < len(self.parts) for index in states)

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo = list(states)
        while todo:
            index = todo.pop()
            if (
                index < len(self.parts)
                and self.parts[index] is _GLOBSTAR
                and index + 1 not in states
            ):
                states.add(index + 1)
                todo.append(index + 1)
        return frozenset(states)


def _name_only(pattern: str) -> bool:
    """A pattern of a file name, wherever it is (no folder part, not hidden, not `**`)."""
    text = pattern.strip()
    return bool(text) and "/" not in text and not text.startswith(".") and text != "**"


@dataclass(slots=True)
class _Filter:
    """Include/exclude globs and their states at one directory."""

    includes: list[_Glob]
    excludes: list[_Glob]
    include_states: list[frozenset[int]] = field(default_factory=list)
    exclude_states: list[frozenset[int]] = field(default_factory=list)

    @classmethod
    def at_root(cls, include: Sequence[str], exclude: Sequence[str]) -> _Filter:
        names = [p for p in include if _name_only(p)]
        includes = [_Glob(p, dot_rule=True) for p in include if not _name_only(p)]
        if names:
            includes.append(_Glob.any_of(names))
        excludes = [_Glob(p, dot_rule=False) for p in exclude]
        return cls(includes, excludes, [g.start() for g in includes], [g.start() for g in excludes])

    def child(self, name: str) -> _Filter:
        return _Filter(
            self.includes,
            self.excludes,
            [g.step(s, name) for g, s in zip(self.includes, self.include_states, strict=True)],
            [g.step(s, name) for g, s in zip(self.excludes, self.exclude_states, strict=True)],
        )

    def excluded(self) -> bool:
        return any(g.accepts(s) for g, s in zip(self.excludes, self.exclude_states, strict=True))

    def wants_file(self) -> bool:
        return not self.excluded() and any(
            g.accepts(s) for g, s in zip(self.includes, self.include_states, strict=True)
        )

    def ignores(self, name: str) -> bool:
        """Whether file `name` is one `include` passes over: not hidden (never taken unless
        named) and not excluded (the user said so), just not an include's kind of file."""
        return not (name.startswith(".") or self.excluded() or self.wants_file())

    def wants_dir(self) -> bool:
        return not self.excluded() and any(
            g.may_match_below(s) for g, s in zip(self.includes, self.include_states, strict=True)
        )


@dataclass(slots=True)
class PassedOver:
    """Files a walk passes over because no `include` pattern takes them (a README, a .txt
    beside the photos): counted for the run summary's "ignored", never rows or errors."""

    ignored: int = 0

    def count(self, name: str, where: _Filter) -> None:
        self.ignored += where.ignores(name)


@dataclass(slots=True)
class _Frame:
    """One directory being listed: its entries (sorted names) and where it sits."""

    rel_parts: tuple[str, ...]
    entries: Iterator[os.DirEntry[str]]
    filter: _Filter
    dir_id: tuple[int, int]


def _as_roots(roots: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    """A lone path is a root too: iterating a str would walk its characters."""
    if isinstance(roots, str | os.PathLike):
        return [os.fspath(roots)]
    return [os.fspath(r) for r in roots]


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return kind
    return "special file"


def _error_entry(path: str, root: str, rel_path: str, message: str) -> SourceFile:
    """An error entry stamped with the entry's own lstat (a link's, not its target's), so its
    error row is its identity for resume: recorded once, again only once the entry changes."""
    try:
        st = os.lstat(path)
    except OSError:
        return SourceFile(path=path, root=root, rel_path=rel_path, error=message)
    return SourceFile(path, root, rel_path, st.st_size, st.st_mtime_ns, message)


def _stat_source(path: str, root: str, rel_path: str) -> SourceFile:
    """A SourceFile for a path named directly (root file, manifest line): stat follows links."""
    source = SourceFile(path=path, root=root, rel_path=rel_path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return _error_entry(path, root, rel_path, "broken symlink")
        source.error = "no such file"
        return source
    except OSError as exc:
        loop = exc.errno == errno.ELOOP
        return _error_entry(
            path, root, rel_path, f"symlink loop: {_reason(exc)}" if loop else _reason(exc)
        )
    if not stat.S_ISREG(st.st_mode):
        source.error = f"not a regular file ({_file_kind(st.st_mode)})"
    source.size, source.mtime_ns = st.st_size, st.st_mtime_ns
    return source


def walk(
    roots: Sequence[str | os.PathLike[str]],
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    follow_symlinks: bool = False,
    skip: Sequence[str] = (),
    passed: PassedOver | None = None,
) -> Iterator[SourceFile]:
    """Yield every file under `roots`, depth-first, entries of a directory in name order.

    Lazy: only the directories on the current path are open, so the first file comes out before
    the rest of the tree is listed and memory does not grow with the tree. Pattern, hidden-file and
    symlink rules are in the module docstring. Folders in `skip` (the run's own output, which may
    sit inside an input folder) are never entered, by whatever path. Never raises for a bad entry.
    `passed` counts the files the patterns pass over.
    """
    passed = passed if passed is not None else PassedOver()
    skip_ids = frozenset(_dir_ids([p for p in skip if not locations.is_url(p)]))
    for root in _as_roots(roots):
        if locations.is_object_url(root):
            yield from walk_objects(
                root, include=include, exclude=exclude, skip=skip, passed=passed
            )
            continue
        root_abs = os.path.abspath(locations.local_path(root))
        try:
            st = os.stat(root_abs)
        except OSError:
            yield _stat_source(root_abs, os.path.dirname(root_abs), os.path.basename(root_abs))
            continue
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in skip_ids:
                continue
            walk_one = _DirWalk(
                root_abs, follow_symlinks=follow_symlinks, skip=skip_ids, passed=passed
            )
            yield from walk_one.files(_Filter.at_root(include, exclude), (st.st_dev, st.st_ino))
        else:
            yield _stat_source(root_abs, os.path.dirname(root_abs), os.path.basename(root_abs))


def _dir_ids(paths: Sequence[str]) -> Iterator[tuple[int, int]]:
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there yet: nothing of it to walk
        yield st.st_dev, st.st_ino


class _DirWalk:
    """The walk of one root directory, with an explicit stack (deep trees need no recursion):
    the directories on the current path are open, each a `_Frame` listing its entries."""

    def __init__(
        self,
        root: str,
        *,
        follow_symlinks: bool,
        skip: frozenset[tuple[int, int]],
        passed: PassedOver,
    ) -> None:
        self.root = root
        self.follow_symlinks = follow_symlinks
        self.skip = skip  # directories never entered, by (device, inode): the run's own output
        self.passed = passed
        self.stack: list[_Frame] = []
        # (device, inode) -> relative parts: the directories on the current path (a link to one
        # of them is a loop) and the symlinked directories walked already (walked only once)
        self.ancestors: dict[tuple[int, int], tuple[str, ...]] = {}
        self.walked_links: dict[tuple[int, int], tuple[str, ...]] = {}

    def files(self, top_filter: _Filter, root_id: tuple[int, int]) -> Iterator[SourceFile]:
        """Every file and error entry under the root, depth-first, each directory in name order."""
        unreadable = self._enter(self.root, (), top_filter, root_id)
        if unreadable is not None:
            yield unreadable
        while self.stack:
            frame = self.stack[-1]
            entry = next(frame.entries, None)
            if entry is None:
                self.stack.pop()
                del self.ancestors[frame.dir_id]
                continue
            found = self._entry(frame, entry)
            if found is not None:
                yield found

    def _entry(self, frame: _Frame, entry: os.DirEntry[str]) -> SourceFile | None:
        """What one directory entry gives: a file, an error entry, or nothing (passed over, or a
        directory now on the stack)."""
        parts = (*frame.rel_parts, entry.name)
        wanted = frame.filter.child(entry.name)
        is_link = False
        try:
            is_link = entry.is_symlink()
            if not (is_link or entry.is_dir(follow_symlinks=False) or wanted.wants_file()):
                self.passed.count(entry.name, wanted)
                return None  # decided from the name alone: spare the stat
            st = os.stat(entry.path) if is_link else entry.stat(follow_symlinks=False)
        except OSError as exc:
            return self._unstatable(entry.path, parts, wanted, is_link, exc)
        if stat.S_ISDIR(st.st_mode):
            return self._directory(entry.path, parts, wanted, is_link, (st.st_dev, st.st_ino))
        return self._file(entry, parts, wanted, st)

    def _unstatable(
        self, path: str, parts: tuple[str, ...], wanted: _Filter, is_link: bool, exc: OSError
    ) -> SourceFile | None:
        if not wanted.wants_file():
            return None
        missing = isinstance(exc, FileNotFoundError)
        if missing and is_link:
            return self._error(path, parts, "broken symlink")
        if exc.errno == errno.ELOOP:
            return self._error(path, parts, f"symlink loop: {_reason(exc)}")
        return None if missing else self._error(path, parts, _reason(exc))  # deleted: gone

    def _directory(
        self,
        path: str,
        parts: tuple[str, ...],
        wanted: _Filter,
        is_link: bool,
        dir_id: tuple[int, int],
    ) -> SourceFile | None:
        if (is_link and not self.follow_symlinks) or not wanted.wants_dir() or dir_id in self.skip:
            return None
        if dir_id in self.ancestors:
            target = _rel(self.ancestors[dir_id])
            return self._error(path, parts, f"symlink loop: points back to {target}")
        if is_link:
            if dir_id in self.walked_links:
                first_seen = _rel(self.walked_links[dir_id])
                return self._error(
                    path, parts, f"symlinked directory already walked as {first_seen}"
                )
            self.walked_links[dir_id] = parts
        return self._enter(path, parts, wanted, dir_id)

    def _enter(
        self, path: str, parts: tuple[str, ...], wanted: _Filter, dir_id: tuple[int, int]
    ) -> SourceFile | None:
        """The directory's listing pushed on the stack; an error entry when it cannot be listed."""
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            return self._error(path, parts, f"unreadable directory: {_reason(exc)}")
        self.ancestors[dir_id] = parts
        self.stack.append(_Frame(parts, iter(entries), wanted, dir_id))
        return None

    def _file(
        self, entry: os.DirEntry[str], parts: tuple[str, ...], wanted: _Filter, st: os.stat_result
    ) -> SourceFile | None:
        if not wanted.wants_file():
            self.passed.count(entry.name, wanted)
            return None
        source = SourceFile(
            path=entry.path,
            root=self.root,
            rel_path=_rel(parts),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
        )
        if not stat.S_ISREG(st.st_mode):
            source.error = f"not a regular file ({_file_kind(st.st_mode)})"
        return source

    def _error(self, path: str, parts: tuple[str, ...], message: str) -> SourceFile:
        return _error_entry(path, self.root, _rel(parts), message)


def _rel(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


def read_manifest(path: str | os.PathLike[str]) -> Iterator[SourceFile]:
    """Yield the files a manifest lists, in its order.

    `.txt`: one path a line; blank lines and lines starting with `#` are skipped, surrounding
    spaces stripped. `.csv`: the `path` (or `image_path`) column when the first row names one,
    else the first column of every row. `.parquet`: the `path` (or `image_path`) column, else the
    first column, read in batches. Relative paths resolve against the manifest's directory, which
    is their root; an absolute path under that directory is relative to it too, any other absolute
    path is its own root (root = its directory). Text is UTF-8 with surrogateescape, so non-UTF-8
    names written by this same OS round-trip. Missing or unusable files become error entries; a
    missing manifest or an unknown suffix raises at once (a config error, not a bad entry).
    """
    manifest = os.fspath(path)
    remote = locations.is_object_url(manifest)
    manifest = locations.normalise_url(manifest) if remote else os.path.abspath(manifest)
    suffix = os.path.splitext(manifest)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"manifest {manifest}: unknown type {suffix!r}, expected one of "
            f"{', '.join(MANIFEST_SUFFIXES)}"
        )
    if not (_remote_exists(manifest) if remote else os.path.isfile(manifest)):
        raise FileNotFoundError(errno.ENOENT, "manifest not found", manifest)
    names = {".txt": _txt_lines, ".csv": _csv_paths, ".parquet": _parquet_paths}[suffix](manifest)
    return _manifest_sources(
        manifest.rpartition("/")[0] if remote else os.path.dirname(manifest), names
    )


def _remote_exists(url: str) -> bool:
    return stores.filesystem(locations.scheme_of(url) or "").isfile(url)


def _open_manifest(manifest: str) -> IO[bytes]:
    if locations.is_object_url(manifest):
        return stores.filesystem(locations.scheme_of(manifest) or "").open(manifest, "rb")
    return open(manifest, "rb")


def _manifest_sources(base: str, names: Iterator[str | tuple[str, str]]) -> Iterator[SourceFile]:
    """Each distinct file once (a path listed twice is one file, one row), rooted at the
    manifest's folder when it lies under it, else at its own folder (never a `..` path); an
    entry that names its root (a pipeline output: image_root, image_path) keeps that root. A URL
    (or an object URL) is its own name: root "", image_path the URL; its size and version are
    filled in later (`input_sources` resolves them in groups)."""
    seen = GrowingDigestSet()
    for entry in names:
        name, given_root = entry if isinstance(entry, tuple) else (entry, None)
        if locations.scheme_of(name) == "file":
            name = _file_url_path(name)
        if locations.scheme_of(name) == "file":  # on another host: its own error row
            yield SourceFile(path=name, root="", rel_path=name, error=_REMOTE_FILE_URL)
            continue
        # an entry's own root (a pipeline output's image_root) wins over the manifest's
        # folder: a manifest kept in a bucket may list local files
        anchor = given_root or base
        if locations.is_http_url(name) or locations.is_object_url(name) or locations.is_url(anchor):
            full = _remote_name(anchor, name)
        else:
            full = os.path.normpath(os.path.join(anchor, name))  # absolute stays
        identity = hashlib.blake2b(os.fsencode(full), digest_size=16).digest()
        if identity in seen:
            continue
        seen.add(identity)
        if locations.is_url(full):
            yield SourceFile(path=full, root="", rel_path=full)
            continue
        inside = os.path.commonpath([anchor, full]) == anchor
        root = anchor if inside else os.path.dirname(full)
        rel_path = os.path.relpath(full, root)
        if os.sep != "/":
            rel_path = rel_path.replace(os.sep, "/")
        yield _stat_source(full, root, posixpath.normpath(rel_path))


_REMOTE_FILE_URL = "a file:// URL on another host is not a local path"


def _file_url_path(url: str) -> str:
    """`file:///abs/a%20b.png` (or `file://localhost/...`) as the local path it names,
    percent-decoded: a manifest is the user's own file, so its `file://` lines are read like its
    path lines (a redirect never leads to one: see inputs/guard.py). Another host's stays a
    URL."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return url
    return unquote(parts.path, errors="surrogateescape")


def _remote_name(base: str, name: str) -> str:
    """A manifest entry as a URL: itself when it is one, else relative to a remote manifest."""
    if locations.is_url(name):
        return locations.normalise_url(name) if locations.is_object_url(name) else name
    return f"{base}/{posixpath.normpath(name.lstrip('/'))}"


def _text(manifest: str, newline: str | None) -> IO[str]:
    raw = _open_manifest(manifest)
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _txt_lines(manifest: str) -> Iterator[str]:
    with _text(manifest, None) as lines:
        for line in lines:
            name = line.strip()
            if name and not name.startswith("#"):
                yield name


def _csv_paths(manifest: str) -> Iterator[str]:
    with _text(manifest, "") as text:
        rows: Iterator[list[str]] = csv.reader(text)
        header = next(rows, None)
        if header is None:
            return
        lowered = [cell.strip().lower() for cell in header]
        column = next((lowered.index(c) for c in MANIFEST_PATH_COLUMNS if c in lowered), None)
        if column is None:  # no header naming a path column: every row is data
            column = 0
            rows = _chain_row(header, rows)
        for row in rows:
            if len(row) > column and row[column].strip():
                yield row[column].strip()


def _chain_row(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def _parquet_paths(manifest: str) -> Iterator[str | tuple[str, str]]:
    # only manifests need it: keeps `import pipeline.inputs.source` light
    import pyarrow.parquet as pq

    with _open_manifest(manifest) as raw, pq.ParquetFile(raw) as table:
        names = table.schema_arrow.names
        if not names:
            return
        column = next((c for c in MANIFEST_PATH_COLUMNS if c in names), names[0])
        # A pipeline output as a manifest: its image_path is relative to image_root.
        rooted = column == "image_path" and "image_root" in names and "path" not in names
        columns = [column, "image_root"] if rooted else [column]
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            roots = batch.column(1).to_pylist() if rooted else [None] * batch.num_rows
            for value, root in zip(batch.column(0).to_pylist(), roots, strict=True):
                if value is None:
                    continue
                name = os.fsdecode(value) if isinstance(value, bytes) else str(value)
                if name.strip():
                    yield (name.strip(), root) if root else name.strip()


def input_sources(
    inp: InputConfig,
    *,
    skip: Sequence[str] = (),
    resolve: Resolver | None = None,
    passed: PassedOver | None = None,
) -> Iterator[SourceFile]:
    """Every file an `[input]` section names: its manifest's entries, then its folders walked
    (never entering the folders in `skip`: the run's output). Manifest URLs and objects get
    their size and version from `resolve` (a HEAD each, RESOLVE_TOGETHER at a time) so the
    resume rule can skip them without a download; without it they stay unknown (not done)."""
    if inp.manifest:
        entries = read_manifest(inp.manifest)
        yield from (entries if resolve is None else _resolved(entries, resolve))
    if inp.paths:
        yield from walk(
            inp.paths,
            include=inp.include,
            exclude=inp.exclude,
            follow_symlinks=inp.follow_symlinks,
            skip=skip,
            passed=passed,
        )


# ------------------------------------------------------------------------------------ groups
# [input] group_by: one request per group of files instead of per file (pipeline/run/runner.py).
GROUP_COLUMN = "group"


def work_units(
    inp: InputConfig,
    *,
    skip: Sequence[str] = (),
    resolve: Resolver | None = None,
    passed: PassedOver | None = None,
) -> Iterator[Work]:
    """What a run asks about, in order: each file alone, or the groups `[input] group_by`
    makes of them (`folder_groups`, `manifest_groups`); `passed` counts the files passed over."""
    sources = input_sources(inp, skip=skip, resolve=resolve, passed=passed)
    if inp.group_by == "folder":
        yield from folder_groups(sources)
    elif inp.group_by == "manifest" and inp.manifest:
        yield from manifest_groups(inp.manifest)
    else:
        yield from sources


def folder_groups(
    sources: Iterable[SourceFile], max_images: int = MAX_IMAGES_PER_REQUEST
) -> Iterator[Work]:
    """The files of each folder as one group, named by the folder relative to its root ("."
    for the files right under it), in the walk's order (by name).

    Streams: a depth-first walk leaves a folder for good, so a folder's group goes out as soon
    as a file from outside it and its sub-folders comes; only the folders on the current path
    are held. A walk's error entry (a broken link, an unreadable folder) is no member: it goes
    out alone, an error row as in an ungrouped run. A folder of more than `max_images` files
    keeps only their count: its group is an error (no request takes that many images).
    """
    collecting: dict[tuple[str, str], _Group] = {}
    for src in sources:
        if src.error:
            yield src
            continue
        folder = (src.root, posixpath.dirname(src.rel_path) or ".")
        for done in [key for key in collecting if not _contains(key, folder)]:
            yield collecting.pop(done).group()
        collecting.setdefault(folder, _Group(*folder, max_images)).add(src)
    for group in collecting.values():
        yield group.group()


def _contains(outer: tuple[str, str], inner: tuple[str, str]) -> bool:
    """Whether folder `inner` is `outer` or lies below it (same root)."""
    (root, name), (inner_root, inner_name) = outer, inner
    if root != inner_root:
        return False
    return name in (".", inner_name) or inner_name.startswith(name + "/")


class _Group:
    """A group being collected: its members in order, up to `max_images` (then only counted)."""

    def __init__(self, root: str, name: str, max_images: int) -> None:
        self.root = root
        self.name = name
        self.max_images = max_images
        self.members: list[SourceFile] = []
        self.count = 0

    def add(self, src: SourceFile) -> None:
        self.count += 1
        if self.count <= self.max_images:
            self.members.append(src)

    def group(self) -> SourceGroup:
        error = None
        if self.count > self.max_images:
            error = (
                f"the group holds {self.count:,} images; a request takes at most "
                f"{self.max_images:,}: split it"
            )
        return SourceGroup(self.name, self.root, tuple(self.members), error)


def manifest_groups(
    path: str | os.PathLike[str], max_images: int = MAX_IMAGES_PER_REQUEST
) -> Iterator[SourceGroup]:
    """The files a manifest lists, grouped by its `group` column (`.csv` or `.parquet`), each
    group's files in the manifest's order (a path listed twice in a group is one member).

    Paths resolve as in `read_manifest`; the group's root is the manifest's folder and its name
    the group value. A group's rows must be listed together (streaming needs no memory of the
    manifest): `check_manifest_groups` refuses a manifest that splits a group before a run
    starts, and this raises ValueError if one gets here. A missing member stays a member: its
    group becomes an error row naming it, since the request cannot be made as listed.
    """
    manifest, base = _manifest_location(path)
    order = _GroupOrder()
    current: _Group | None = None
    paths: set[str] = set()  # one group's members: few, a plain set is fine
    for row, (name, group) in enumerate(_group_rows(manifest), start=1):
        if order.starts(row, group):
            if current is not None:
                yield current.group()
            current, paths = _Group(base, str(group), max_images), set()
        assert current is not None
        full = os.path.normpath(os.path.join(base, name))
        if full not in paths:
            paths.add(full)
            current.add(next(_manifest_sources(base, iter((full,)))))  # rooted as listed alone
    if current is not None:
        yield current.group()


def check_manifest_groups(path: str | os.PathLike[str]) -> None:
    """ValueError naming the first problem of a grouped manifest: no group column, a row
    without a group, or a group whose rows are not listed together. Reads only the columns."""
    manifest, _ = _manifest_location(path)
    order = _GroupOrder()
    for row, (_, group) in enumerate(_group_rows(manifest), start=1):
        order.starts(row, group)


class _GroupOrder:
    """Checks that every row has a group and each group's rows come together (a digest of each
    finished group's name is kept: 16 bytes a group)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.closed = GrowingDigestSet()

    def starts(self, row: int, group: str | None) -> bool:
        """Whether `group` starts at this row; ValueError when the row breaks the rules."""
        if not group:
            raise ValueError(f"row {row} has no {GROUP_COLUMN} (every row needs one)")
        if group == self.current:
            return False
        if _name_digest(group) in self.closed:
            raise ValueError(
                f"the rows of {GROUP_COLUMN} {group[:80]!r} are not listed together (again at "
                f"row {row}): sort the manifest by {GROUP_COLUMN}"
            )
        if self.current is not None:
            self.closed.add(_name_digest(self.current))
        self.current = group
        return True


def _name_digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _manifest_location(path: str | os.PathLike[str]) -> tuple[str, str]:
    manifest = os.path.abspath(os.fspath(path))
    suffix = os.path.splitext(manifest)[1].lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{manifest}: a manifest with a {GROUP_COLUMN} column is .csv or .parquet")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(errno.ENOENT, "manifest not found", manifest)
    return manifest, os.path.dirname(manifest)


def _group_rows(manifest: str) -> Iterator[tuple[str, str | None]]:
    """(path, group) of each row with a path, in order; ValueError without both columns."""
    if manifest.lower().endswith(".csv"):
        yield from _csv_group_rows(manifest)
    else:
        yield from _parquet_group_rows(manifest)


def _csv_group_rows(manifest: str) -> Iterator[tuple[str, str | None]]:
    with open(manifest, encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
        rows = csv.reader(text)
        header = [cell.strip().lower() for cell in next(rows, [])]
        path_at = next((header.index(c) for c in MANIFEST_PATH_COLUMNS if c in header), None)
        if path_at is None or GROUP_COLUMN not in header:
            raise ValueError(f"{manifest}: needs a header naming the path and group columns")
        group_at = header.index(GROUP_COLUMN)
        for row in rows:
            if len(row) > path_at and row[path_at].strip():
                group = row[group_at].strip() if len(row) > group_at else ""
                yield row[path_at].strip(), group or None


def _parquet_group_rows(manifest: str) -> Iterator[tuple[str, str | None]]:
    import pyarrow.parquet as pq  # only manifests need it

    with pq.ParquetFile(manifest) as table:
        names = table.schema_arrow.names
        column = next((c for c in MANIFEST_PATH_COLUMNS if c in names), None)
        if column is None or GROUP_COLUMN not in names:
            raise ValueError(f"{manifest}: needs a path (or image_path) and a group column")
        columns = [column, GROUP_COLUMN]
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            paths, groups = (batch.column(i).to_pylist() for i in range(2))
            for value, group in zip(paths, groups, strict=True):
                name = os.fsdecode(value) if isinstance(value, bytes) else value
                if name is not None and str(name).strip():
                    text = None if group is None else str(group).strip()
                    yield str(name).strip(), text or None


def _resolved(entries: Iterator[SourceFile], resolve: Resolver) -> Iterator[SourceFile]:
    """Entries in their order, remote ones resolved in groups (the rest pass through)."""
    while group := list(itertools.islice(entries, RESOLVE_TOGETHER)):
        remote = [src for src in group if locations.is_url(src.path) and src.error is None]
        if remote:
            resolve(remote)
        yield from group


# --------------------------------------------------------------------------- object stores
def walk_objects(
    url: str,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    skip: Sequence[str] = (),
    page: int = S3_PAGE,
    passed: PassedOver | None = None,
) -> Iterator[SourceFile]:
    """Every object under an object-store prefix, in key order, with `walk`'s pattern and
    hidden-name rules (an object URL naming one object yields it whatever the patterns say).

    S3 is listed a page of S3_PAGE keys at a time (ListObjectsV2 with its continuation token):
    memory holds one page, whatever the bucket holds. Other stores are walked folder by folder
    through fsspec's `ls`, so memory holds the folders on the current path (a single folder of
    millions of objects is held whole there). Folder markers (keys ending in "/") are skipped.
    Listing errors (no such bucket, access denied) raise: the run cannot start, as with a
    missing input folder.
    """
    root = locations.normalise_url(url)
    scheme = locations.scheme_of(root) or ""
    fs = stores.filesystem(scheme)
    skipped = tuple(locations.normalise_url(p) + "/" for p in skip if locations.is_object_url(p))
    listing = _s3_listing(fs, root, page) if scheme == "s3" else _fs_listing(fs, root)
    found = False
    for rel, size, version, content in _filtered(
        listing, _Filter.at_root(include, exclude), passed or PassedOver()
    ):
        found = True
        full = f"{root}/{rel}"
        if not full.startswith(skipped):
            stamp = version_stamp(version)
            yield SourceFile(full, root, rel, size=size, mtime_ns=stamp, content_id=content)
    if not found:
        yield from _single_object(fs, root)


def _single_object(fs: Any, url: str) -> Iterator[SourceFile]:
    """A root naming one object yields it (the user named it); nothing there is an error."""
    parent, _, name = url.rpartition("/")
    try:
        info = fs.info(url)
    except FileNotFoundError:
        if not fs.exists(parent.split("://", 1)[1].split("/", 1)[0]):
            raise FileNotFoundError(errno.ENOENT, "no such bucket", url) from None
        return
    if info.get("type") == "file":
        yield object_source(url, parent, name, info)


def object_source(url: str, root: str, rel_path: str, info: dict[str, Any]) -> SourceFile:
    """The SourceFile of an object from its metadata (fsspec's `info`): size, version stamp
    and content id, nothing read."""
    size, version = int(info.get("size") or 0), version_stamp(stores.object_version(info))
    return SourceFile(url, root, rel_path, size, version, content_id=stores.content_id(info))


def _filtered(listing: Iterator[Listed], top: _Filter, passed: PassedOver) -> Iterator[Listed]:
    """Keys (relative, "/"-separated) that the patterns want, the filter state of each folder
    computed once while consecutive keys share it."""
    stack: list[tuple[str, _Filter]] = [("", top)]
    for listed in listing:
        *folders, name = listed[0].split("/")
        common = 0
        while common < len(folders) and common + 1 < len(stack):
            if stack[common + 1][0] != folders[common]:
                break
            common += 1
        del stack[common + 1 :]
        wanted = True
        for folder in folders[common:]:
            state = stack[-1][1].child(folder)
            stack.append((folder, state))
        if not all(state.wants_dir() for _, state in stack[1:]):
            wanted = False
        if not (wanted and name):
            continue
        if stack[-1][1].child(name).wants_file():
            yield listed
        else:
            passed.count(name, stack[-1][1].child(name))


def _s3_listing(fs: Any, root: str, page_size: int) -> Iterator[Listed]:
    """(key relative to the prefix, size, ETag, no content id) page by page, in S3's key order
    (UTF-8 bytes); each page through s3fs, which retries throttling and transient errors."""
    bucket, _, prefix = root.split("://", 1)[1].partition("/")
    prefix = f"{prefix}/" if prefix else ""
    token: str | None = None
    while True:
        ask: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            ask["ContinuationToken"] = token
        page = fs.call_s3("list_objects_v2", **ask)
        for item in page.get("Contents", ()):
            if not item["Key"].endswith("/"):
                key, etag = item["Key"][len(prefix) :], str(item.get("ETag", ""))
                yield key, int(item["Size"]), etag, ""
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def _fs_listing(fs: Any, root: str) -> Iterator[Listed]:
    """Depth-first, names in order, one folder listing per folder on the current path."""
    top = fs._strip_protocol(root).rstrip("/")
    stack = [iter(_ls(fs, top))]
    while stack:
        info = next(stack[-1], None)
        if info is None:
            stack.pop()
            continue
        path = fs._strip_protocol(info["name"]).rstrip("/")
        if info.get("type") == "directory":
            stack.append(iter(_ls(fs, path)))
        elif not path.endswith("/"):
            size, version = int(info.get("size") or 0), stores.object_version(info)
            yield path[len(top) + 1 :], size, version, stores.content_id(info)


class ListingFailed(exits.StoppedEarly):
    """A folder of the inputs' store that could not be listed for a transient reason (a timeout,
    an outage) once the store client's retries were spent: the walk cannot go on, so the run
    stops (exit 3) naming the folder; a rerun resumes."""


def _ls(fs: Any, path: str) -> list[dict[str, Any]]:
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as exc:
        if not stores.transient(exc):
            raise
        where = fs.unstrip_protocol(path)
        raise ListingFailed(f"{where}: listing failed: {stores.failure_text(exc)}") from None
    return sorted(found, key=lambda info: info["name"])
