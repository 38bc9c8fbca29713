"""The plan of a run: what a run of a config would do now with each unit of its inputs, decided
by the run's own tests, without a call, a write or an API key.

    walk (the run's own: pipeline/run/walk.py) ─► done? (the resume index) ─► in a Batch
      Mode job in flight (either mode)? ─► unusable? (header) ─► copy? (the key's answer is
      committed, or asked earlier in this plan: `Bought`'s test) ─► why it is bought:
      new | changed | settings | retry (`ResumeIndex.why`: the current row's verdict)

Every decision is the run's: the walk is the run's `Walk`, `DoneOrInFlight` its test
(the index read with the answers a killed or running run holds in its journal, which a run
commits before it walks),
the key is made as the runner makes it (the bytes' sha256, or the content id of a gs:// object
Vertex reads in place, and the suffix of the sizes sent), and a key in the index's `ok_keys` is
what `Bought.find` copies. Only the files the run would read anyway are read whole (to hash
them), up to a budget (`Hashes`: past it, an upper bound), an object sent in place only its
header; a finished output is walked with a stat each.

`pipeline estimate` prices the plan (pipeline/commands/estimate.py); `run --plan` prints it;
`left` counts what the walk leaves to do without measuring anything (a stat a unit), the counts
the plan starts from (`Plan.left`): what `pipeline status --config` reports; `redo_guard`
refuses a run whose plan redoes more committed rows because settings changed than `[limits]
max_redo` allows, unless the user said yes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import exits
from pipeline.config import Config, ImagesConfig
from pipeline.inputs import images, in_place
from pipeline.inputs.fetch import Fetcher, FetchError, settings_from
from pipeline.locations import is_url
from pipeline.output.index import (
    DigestSet,
    DoneOrInFlight,
    ResumeIndex,
    RetryRows,
    load_resume_index,
)
from pipeline.output.index_cache import CHANGED, NEW, CurrentRows
from pipeline.output.parts import RUNS_DIR, current_rows
from pipeline.output.state import BatchJobRecord, peek_batch
from pipeline.output.stores import open_store
from pipeline.records import (
    ImageItem,
    KeySuffixes,
    SourceFile,
    Work,
    as_group,
    group_sha256,
    make_key,
    members_of,
    work_identity,
)
from pipeline.run.identity import suffixes_of
from pipeline.run.walk import IN_FLIGHT, Walk

WINDOW = 64  # units measured together: the remote ones among them are read concurrently
COPY, SETTINGS, RETRY = "copy", "settings", "retry"
# The order the plan lists what a run buys, then what costs nothing more.
BOUGHT = (NEW, CHANGED, SETTINGS, RETRY)
CATEGORIES = (*BOUGHT, COPY, IN_FLIGHT)
SAMPLES = 5  # paths named for each category (the guard's message, the estimate's --json)
# Bytes a plan reads whole to hash (`Hashes`): ~2-10 s of reading, an exact answer for any input
# below it (the samples, a nightly increment), an upper bound past it
WHOLE_READ_MB = 1024

Sizes = list[tuple[int, int]]


class RedoRefused(exits.NotStarted):
    """The run would redo more committed rows than `[limits] max_redo` allows because settings
    changed, and the user did not say yes (exit `exits.CONFIRM`)."""


@dataclass
class Left:
    """What the walk leaves a run to do, before anything is measured: the units walked, those
    done, those in a Batch Mode job in flight, and the others (to do) by the resume index's
    verdict (NEW, CHANGED, SETTINGS, RETRY; a copy or an unusable file is counted by its verdict
    here, the plan then sets it apart; a URL whose HEAD gave no version, CHANGED here if it has
    a row, the plan asks again once its GET gave one). `left` tells RETRY alone apart (TO_DO:
    the others), which is all `report` says."""

    files: int = 0  # units: groups, when the config groups its files
    done: int = 0
    in_flight: int = 0
    to_do: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, int]:
        """The counts `status --config`, `estimate` and `run --plan` report alike."""
        return {
            "files": self.files,
            "done": self.done,
            "to_do": self.to_do.total(),
            "retry": self.to_do[RETRY],
            "in_flight": self.in_flight,
        }


@dataclass
class Plan:
    """What a run would do with each unit (see the module docstring). `units` holds the sent
    sizes of the units of each category; `committed` the current rows of this task; `left` the
    walk's counts it was made from."""

    units: dict[str, list[Sizes]] = field(default_factory=lambda: {c: [] for c in CATEGORIES})
    samples: dict[str, list[str]] = field(default_factory=dict)
    left: Left = field(default_factory=Left)
    unusable: int = 0
    unhashed: int = 0  # units bought past the budget of whole reads: copies among them not told
    committed: int = 0
    jobs: list[BatchJobRecord] = field(default_factory=list)  # Batch Mode jobs in flight
    redone: list[tuple[str, str]] = field(default_factory=list)  # (root, path): settings units
    settings_sources: list[dict[str, Any]] = field(default_factory=list)

    def add(self, category: str, sizes: Sizes, name: str, root: str = "") -> None:
        self.units[category].append(sizes)
        if category == SETTINGS:
            self.redone.append((root, name))
        shown = self.samples.setdefault(category, [])
        if len(shown) < SAMPLES:
            shown.append(name)

    def count(self, category: str) -> int:
        return len(self.units[category])

    @property
    def done(self) -> int:
        return self.left.done

    @property
    def bought(self) -> list[Sizes]:
        """Every unit the run would pay for, in the order of BOUGHT."""
        return [unit for category in BOUGHT for unit in self.units[category]]


def plan(
    config: Config,
    *,
    limit: int | None = None,
    retry_errors: bool = False,
    hashes: Hashes | None = None,
) -> Plan:
    """The plan of a run of `config` starting now (`limit`, `retry_errors`: as the run's);
    `hashes`: the files read whole so far (`Hashes`: a budget, and what `tune`'s plans share)."""
    hashes = hashes if hashes is not None else Hashes()
    index = _index(config, retry_errors, CurrentRows)
    result = Plan(committed=_committed(config))
    asked: set[str] = set()  # keys of this plan: a twin of one is copied, as in a run
    with Fetcher(settings_from(config)) as fetcher:
        walker, result.jobs = _walker(config, index, fetcher, limit)
        walker.on_skip = _skipped(result)
        walk = _tallied(walker, index, config.task.kind, result.left)
        for window in iter(lambda: list(itertools.islice(walk, WINDOW)), []):
            units = _measured([work for work, _ in window], config, fetcher)
            for (work, _), unit in zip(window, units, strict=True):
                # asked again: a URL's GET fills in the size and version its HEAD did not give
                why = index.why(*work_identity(work), config.task.kind)
                _place(index, result, (asked, hashes), work, why, unit)
    if result.count(SETTINGS):
        result.settings_sources = _settings_sources(config, result)
    return result


def left(config: Config, *, retry_errors: bool = False) -> Left:
    """What a run of `config` starting now would still do, by the plan's own walk and verdicts
    (`Left`), with nothing measured or read: a stat a unit (objects' and manifest URLs' versions
    asked, as the run asks them). Its memory is the run's own resume index (the done files), and
    of the other current rows only those to retry (`RetryRows`): the units are counted as they
    are walked, the new, changed and settings ones not told apart (one count, `to_do`)."""
    index = _index(config, retry_errors, RetryRows, copies=False)
    counted = Left()
    with Fetcher(settings_from(config)) as fetcher:
        walker, _ = _walker(config, index, fetcher, None)
        for _ in _tallied(walker, index, config.task.kind, counted):
            pass
    return counted


def _walker(
    config: Config, index: ResumeIndex, fetcher: Fetcher, limit: int | None
) -> tuple[Walk, list[BatchJobRecord]]:
    """The run's walk over `config`'s inputs, and the Batch Mode jobs in flight whose files it
    skips: a job in flight is never bought again, in either mode (pipeline/run/walk.py)."""
    jobs, in_flight = peek_batch(config.output.dir)
    return Walk(config, DoneOrInFlight(index, DigestSet(in_flight)), fetcher, limit), jobs


def _tallied(
    walker: Walk, index: ResumeIndex, task: str, counted: Left
) -> Iterator[tuple[Work, str]]:
    """Each unit the walk yields with the resume index's verdict on it, counted in `counted`
    with the walk's own counts (done, in flight) once it ends."""
    for work in walker.units():
        why = index.why(*work_identity(work), task)
        counted.to_do[why] += 1
        yield work, why
    counted.files, counted.done, counted.in_flight = walker.seen, walker.done, walker.in_flight


def _index(
    config: Config,
    retry_errors: bool,
    explain: type[CurrentRows] | type[RetryRows],
    *,
    copies: bool = True,
) -> ResumeIndex:
    """The run's resume index, the current rows' verdicts kept (`explain`: every one, or those
    to retry); `copies`: the ok keys a plan copies from."""
    return load_resume_index(
        config.output.dir,
        key_suffix=suffixes_of(config),
        retry_errors=retry_errors,
        explain=explain,
        journal=_exists(config.output.dir),  # (a folder not made yet holds no journal)
        copies=copies,
    )


def _skipped(result: Plan) -> Callable[[str, Work], None]:
    """The walk's units in a job in flight listed in the plan (its samples; the walk counts
    them, and the units done)."""

    def listed(why: str, work: Work) -> None:
        if why == IN_FLIGHT:
            result.add(IN_FLIGHT, [], work_identity(work)[1])

    return listed


@dataclass
class _Measured:
    grouped: bool  # a group's unit (its key is the group's sha256, even of one member)
    items: list[ImageItem]
    data: list[bytes | None]  # an object's or a URL's bytes, read to measure it


def _measured(window: list[Work], config: Config, fetcher: Fetcher) -> list[_Measured]:
    """Each unit's members measured from their headers: objects that go in place from a ranged
    read of their header, as the runner measures them; other objects and URLs read whole,
    together (their bytes kept: the plan hashes them)."""
    members = [
        src for work in window for src in members_of(work) if is_url(src.path) and not src.error
    ]
    placed = _in_place(members, config, fetcher)
    remote = [src for src in members if id(src) not in placed]
    read: dict[int, Any] = dict(zip(map(id, remote), fetcher.read_all(remote), strict=True))
    read.update(placed)
    return [_measure_unit(work, read, config.images) for work in window]


def _in_place(sources: list[SourceFile], config: Config, fetcher: Fetcher) -> dict[int, Any]:
    """The items of the objects measured from their header (in_place.measured: one that goes
    in place, or one whose header is unreadable), by id of their SourceFile."""
    wanted = [src for src in sources if in_place.by_metadata(config, src)]
    options = config.images
    found = fetcher.gather([in_place.measured(fetcher.read_range, src, options) for src in wanted])
    return {id(src): item for src, item in zip(wanted, found, strict=True) if item is not None}


def _measure_unit(work: Work, read: dict[int, Any], options: ImagesConfig) -> _Measured:
    """A unit's members measured as the run prepares them (`options`: its max_side, and its
    verify, which turns a PNG by an eXIf chunk after its pixels)."""
    unit = _Measured(as_group(work) is not None, [], [])
    for src in members_of(work):
        got = read.get(id(src))
        if isinstance(got, ImageItem):  # measured in place: nothing downloaded
            unit.items.append(got)
            unit.data.append(None)
        elif isinstance(got, FetchError):
            unit.items.append(ImageItem(source=src, error=str(got)))
            unit.data.append(None)
        else:
            item = images.measure(src, max_side=options.max_side, data=got, verify=options.verify)
            unit.items.append(item)
            unit.data.append(got)
    return unit


def _place(
    index: ResumeIndex,
    result: Plan,
    seen: tuple[set[str], Hashes],
    work: Work,
    why: str,
    unit: _Measured,
) -> None:
    """Put one unit the walk did not skip in its category (`why`: the index's verdict once the
    unit is measured, its category when it is bought). `seen`: the keys of this plan (a twin of
    one is copied, as in a run) and the files read whole."""
    root, name = work_identity(work)[:2]
    if work.error is not None or any(item.error for item in unit.items):
        result.unusable += 1  # an error row, no call
        return
    sizes = [(item.sent_width, item.sent_height) for item in unit.items]
    asked, hashes = seen
    sha = _sha256(unit, hashes)
    if sha is None:  # not read whole (past the budget): bought, as far as the plan knows
        result.unhashed += 1
    else:
        key = make_key(sha, index.ok_keys.suffixes.of(_displayed(unit)))
        if key in index.ok_keys or key in asked:
            result.add(COPY, sizes, name)
            return
        asked.add(key)
    result.add(why, sizes, name, root)


def _displayed(unit: _Measured) -> Sizes:
    """Displayed sizes: what decides whether `max_side` shrinks an image (the key's suffix)."""
    return [(item.width, item.height) for item in unit.items]


def _sha256(unit: _Measured, hashes: Hashes) -> str | None:
    """The unit's sha256 as the runner computes it (the file's, or the group's); None when a
    member is past the budget of whole reads."""
    pairs = zip(unit.items, unit.data, strict=True)
    shas = [_file_sha256(item, data, hashes) for item, data in pairs]
    known = [sha for sha in shas if sha is not None]
    if len(known) < len(shas):
        return None
    return group_sha256(known) if unit.grouped else known[0]


def _file_sha256(item: ImageItem, data: bytes | None, hashes: Hashes) -> str | None:
    if item.in_place:  # keyed by the object's content id, as the runner keys it
        return item.sha256
    return hashes.sha256(item.source, data)


class Hashes:
    """The sha256 of the files a plan reads whole to tell copies (free) from purchases.

    A file to buy that is neither in the resume index nor size+mtime-matched must be read whole
    to know whether it is a copy, and a full read of a large new input (1M photos: terabytes)
    takes hours where its headers take minutes. So a plan reads at most `budget` bytes whole
    (WHOLE_READ_MB by default; None: every file, `--exact`) and counts the units past it as
    bought: their copies are not detected, and the estimate says it is an upper bound. Copies
    can only lower the cost, so that bound is the safe side of a price. Objects and URLs are
    read by the plan anyway (to measure them): theirs are always hashed. Kept by (path, size,
    mtime): plans of several settings over the same inputs (`pipeline tune`) read a file once.
    """

    def __init__(self, budget_mb: float | None = WHOLE_READ_MB, *, remember: bool = False) -> None:
        self.budget = None if budget_mb is None else int(budget_mb * 2**20)
        self.read = 0  # bytes read whole
        self.past_budget = False
        self.remember = remember  # (~200 bytes a file: kept only when plans share them)
        self.known: dict[tuple[str, int, int], str] = {}

    def sha256(self, src: SourceFile, data: bytes | None) -> str | None:
        """`src`'s sha256 (from `data` when it was read), or None past the budget or when the
        file can no longer be read (deleted since it was measured): bought, as far as it knows."""
        if data is not None:
            return hashlib.sha256(data).hexdigest()
        place = (src.path, src.size, src.mtime_ns)
        if (known := self.known.get(place)) is not None:
            return known
        if self.budget is not None and self.read + src.size > self.budget:
            self.past_budget = True  # (from here on: a tail of the walk, not a scatter)
        if self.past_budget:
            return None
        self.read += src.size
        try:
            sha = images.file_sha256(src.path)
        except OSError:
            return None
        if self.remember:
            self.known[place] = sha
        return sha


def _committed(config: Config) -> int:
    """The current rows of this task in the output (what `max_redo` is a share of)."""
    if not _exists(config.output.dir):
        return 0
    tasks = current_rows(config.output.dir, ["task"]).column("task")
    return int(pc.sum(pc.equal(tasks, config.task.kind)).as_py() or 0)


# ------------------------------------------------------------------ why settings redo rows
def _settings_sources(config: Config, result: Plan) -> list[dict[str, Any]]:
    """Who made the rows a settings change would redo (the current rows of the units in that
    category): their model, key suffix, rows and the latest run (and its config file) that made
    them, most rows first."""
    suffixes = suffixes_of(config)
    counted, latest = _tally(_redone_rows(config, result))
    return [
        {
            "model": model,
            "key_suffix": suffix,
            "rows": rows,
            "run_id": latest[(model, suffix)],
            "config": _run_config(config.output.dir, latest[(model, suffix)]),
            "why": _why(config, suffixes, model, suffix),
        }
        for (model, suffix), rows in counted.most_common()
    ]


def _redone_rows(config: Config, result: Plan) -> pa.Table:
    """The current rows of this task of the units a settings change redoes."""
    columns = ["image_root", "image_path", "task", "model", "key", "run_id"]
    table = current_rows(config.output.dir, columns)
    places = pc.binary_join_element_wise(table["image_root"], table["image_path"], "\0")
    wanted = pa.array(["\0".join(place) for place in result.redone], pa.string())
    mine = pc.and_(pc.equal(table["task"], config.task.kind), pc.is_in(places, wanted))
    return table.filter(pc.fill_null(mine, False))


Source = tuple[str, str]  # (model, key suffix) of a row


def _tally(rows: pa.Table) -> tuple[Counter[Source], dict[Source, str]]:
    """Rows by (model, key suffix), and the latest run id of each."""
    counted: Counter[Source] = Counter()
    latest: dict[Source, str] = {}
    for row in rows.to_pylist():
        source = (row["model"] or "", row["key"].rpartition(".")[2])
        counted[source] += 1
        latest[source] = max(latest.get(source, ""), row["run_id"] or "")
    return counted, latest


def _why(config: Config, suffixes: KeySuffixes, model: str, suffix: str) -> str:
    """What differs between the request that made a row and the run's, as far as a row says."""
    if model and model != config.api.model:
        return f"model {model} -> {config.api.model}"
    if suffixes.owns(suffix):  # its request, had max_side not shrunk the image
        return f"[images] max_side = {config.images.max_side} now shrinks these images"
    return "the request differs (prompt, generation settings, reference images or max_side)"


def _run_config(output_dir: str, run_id: str) -> str | None:
    """The config file a run was started from (its summary in `.runs/`), if recorded."""
    store = open_store(output_dir)
    name = f"{RUNS_DIR}/{run_id}.json"
    try:
        return json.loads(store.read(name)).get("config")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------ the guard
def redo_guard(
    config: Config, index: ResumeIndex, *, limit: int | None = None, retry_errors: bool = False
) -> None:
    """Refuse (RedoRefused) a run of `config` whose plan redoes more of this task's committed
    rows than `[limits] max_redo` allows because settings changed. `index`: the run's resume
    index, which bounds the redo for free: at most its current rows another request made, out of
    at least its other current rows (another task's rows count as made by another request, so
    this bound cannot tell them apart). Within the bound (the nightly run) nothing more is
    done; past it the input is walked for the plan (a stat a file; the files redone are hashed
    to tell copies, which cost nothing, from purchases), once more a run for an output two tasks
    share."""
    allowed, stale = config.limits.max_redo, index.settings_rows
    if allowed >= 1 or stale <= allowed * (index.current_rows - stale):
        return
    # exact: a refusal on an upper bound would stop a run that redoes no more than allowed
    found = plan(config, limit=limit, retry_errors=retry_errors, hashes=Hashes(None))
    redone = found.count(SETTINGS)
    if redone > allowed * found.committed:
        raise RedoRefused(refusal(config, found))


def _exists(output_dir: str) -> bool:
    return is_url(output_dir) or os.path.isdir(output_dir)


def refusal(config: Config, found: Plan) -> str:
    """What would be redone and why, and how to go on."""
    redone, committed = found.count(SETTINGS), found.committed
    share = f"{config.limits.max_redo:.0%}"
    lines = [
        f"{config.source}: this run would redo {redone:,} of the {committed:,} committed "
        f"{config.task.kind} rows because settings changed (more than [limits] max_redo = "
        f"{share} of them):"
    ]
    for source in found.settings_sources:
        made = f"run {source['run_id']}" + (f" ({source['config']})" if source["config"] else "")
        lines.append(f"  {source['rows']:,} rows made by {made}: {source['why']}")
    lines.append(f"  e.g. {', '.join(found.samples.get(SETTINGS, []))}")
    lines.append(
        "rerun with --yes to redo them (pipeline.run(..., yes=True); or raise [limits] "
        "max_redo); `pipeline estimate` prices it"
    )
    return "\n".join(lines)
