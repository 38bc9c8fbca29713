"""The per-request engine, the same whatever spreads the work: one unit in, at most one row out.

    SourceFile | SourceGroup ─prepare─► Unit ─key─► reuse? (Bought) ───────► row (rows.py) ─► sink
                                                  └──buy (Buyer)──► Outcome ─┘
                                                                  └► None: its row comes later

A unit is what one request asks about: a lone file (a unit of one, whose row is the image's), or
a group's files in their order (`[input] group_by`: pipeline/inputs/source.py), whose row is the
group's. Both take the one path below; only the row's identity columns differ (rows.py).
`ImageRunner.process` is what every engine runs for each piece of work it hands out: one process
(engines/single.py) and Ray's workers with the interactive buyer (run/buyers.py), Batch Mode
(engines/batch/engine.py) with the buyer that puts the request in a job — so preparing, keying,
reuse and the rows of a failure before any call are the same code whichever buys the answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline import locations
from pipeline.config import Config
from pipeline.cost import row_cost
from pipeline.inputs import images, in_place
from pipeline.inputs.fetch import Fetcher, FetchError, settings_from
from pipeline.output.sink import ParquetSink
from pipeline.records import (
    USAGE_COLUMNS,
    ImageItem,
    SourceFile,
    SourceGroup,
    Unit,
    Work,
    as_group,
    group_sha256,
    make_key,
    members_of,
)
from pipeline.run.buyers import Buyer
from pipeline.run.decodes import DecodeBudget, budget_bytes
from pipeline.run.identity import RunIdentity
from pipeline.run.offload import offload
from pipeline.run.reuse import Bought
from pipeline.run.rows import answered_row, copied_outcome_row, copied_row, error_row

# Preparing a file up to this size runs on the event loop (offload.py); bigger ones in threads.
SMALL_FILE = 1 << 20
# ... and so does its decode while it holds no more than this (a 2-MP image: ~20 ms of CPU); a
# small file can still decode to many pixels (a flat PNG screenshot), which would stall the loop.
SMALL_DECODE = 16 << 20


@dataclass
class RunOptions:
    retry_errors: bool = False
    limit: int | None = None  # at most this many new files (or groups)
    progress: bool = True
    seed: int | None = None  # backoff jitter; None: from the OS
    submit_only: bool = False  # Batch Mode: submit the jobs and exit; a later run collects
    # refuse a settings change that redoes more than [limits] max_redo (run/plan.py): the front
    # doors (cli, api) ask unless told --yes; an engine's own caller (a test) does not
    ask_before_redo: bool = False


class RowCounts:
    """Rows by status, copies, billed tokens and their cost (pipeline/cost.py): the part of the
    summary rows decide."""

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.copied = 0
        self.cost_usd = 0.0

    def add(self, row: dict[str, Any], *, copied: bool) -> None:
        self.rows[row["status"]] += 1
        self.copied += copied
        if row.get("prompt_tokens") is None:
            return
        self.cost_usd += row_cost(row) or 0.0
        for name in USAGE_COLUMNS:
            self.tokens[name] += row.get(name) or 0
        self.tokens["est_image_tokens"] += row.get("est_image_tokens") or 0
        self.tokens["est_prompt_tokens"] += row.get("est_prompt_tokens") or 0


class ImageRunner:
    """Turns one piece of work into its row (see the module docstring) and hands it to the sink.

    `bought` are the run's reusable answers (looked up here, before buying); `counts` the
    run's row counts, shared when an engine runs two runners (Batch Mode and its interactive
    retries) whose rows make one summary; `decodes` the budget of decoded pixels in flight
    (run/decodes.py), shared by the runners of one process (a new one when not given)."""

    def __init__(
        self,
        config: Config,
        identity: RunIdentity,
        *,
        buyer: Buyer,
        bought: Bought,
        sink: ParquetSink,
        fetcher: Fetcher | None = None,
        counts: RowCounts | None = None,
        decodes: DecodeBudget | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.buyer = buyer
        self.bought = bought
        self.sink = sink
        self.fetcher = fetcher  # reads objects and URLs; made on first need when not given
        self.counts = counts or RowCounts()
        self.decodes = decodes or DecodeBudget(budget_bytes(config.images.decode_budget_mb))

    async def process(self, work: Work) -> None:
        """Raises Stopped / RunStopped when the run stops before this work has a row."""
        row, copied = await self._row(work)
        if row is None:
            return  # bought later: the row is made when its answer comes
        await self.sink.add(row, journaled=True)  # in the OS before this worker buys again
        self.counts.add(row, copied=copied)

    async def _row(self, work: Work) -> tuple[dict[str, Any] | None, bool]:
        unit = await self._prepare(work)
        if unit.error:
            return error_row(unit, unit.error, self.identity), False
        # the image's own suffix: what `max_side` does to it is known only now it is read
        key = make_key(unit.sha256, self.identity.suffixes.of(sizes_of(unit)))
        found = await self.bought.find(key, unit.sha256)
        if found is not None and found.outcome is not None:
            return copied_outcome_row(unit, key, found.outcome, self.identity), True
        if found is not None and found.row is not None:
            return copied_row(found.row, unit, key, self.identity), True
        outcome = await self.buyer.buy(unit, key)
        if outcome is None:
            return None, False
        return answered_row(unit, key, outcome, self.identity), False

    async def _prepare(self, work: Work) -> Unit:
        """The unit of a lone file or a group: each member prepared, in order, until one fails
        (the group is then an error naming that member; the rest stay unread)."""
        group, members = as_group(work), members_of(work)
        items = [ImageItem(source=src) for src in members]
        if group is not None and group.error:
            return Unit(tuple(items), group, error=group.error)
        for index, src in enumerate(members):
            items[index] = await self._prepared(src)
            if items[index].error:
                break
        return unit_of(tuple(items), group)

    def _fetcher(self) -> Fetcher:
        if self.fetcher is None:
            self.fetcher = Fetcher(settings_from(self.config))
        return self.fetcher

    def prefetch(self, src: SourceFile) -> None:
        """Start reading `src` for a worker that takes it soon (Fetcher.prefetch), unless it is
        an object measured from its header and never downloaded (in_place.py)."""
        if not in_place.by_metadata(self.config, src):
            self._fetcher().prefetch(src)

    async def _prepared(self, src: SourceFile) -> ImageItem:
        """One file made ready to send (an object's or a URL's bytes read first, unless it
        goes in place as it is stored: in_place.py); an item carrying `error` when it cannot
        be used."""
        if src.error:
            return ImageItem(source=src, error=src.error)
        if in_place.by_metadata(self.config, src):
            item = await in_place.measured(self._fetcher().read_range, src, self.config.images)
            if item is not None:
                return item
        item, data = await self._read_and_prepare(src)
        item.in_place = in_place.sent_as_stored(self.config, item, data)
        return item

    async def _read_and_prepare(self, src: SourceFile) -> tuple[ImageItem, bytes | None]:
        """The prepared item, and the bytes of an object or a URL it was prepared from."""
        data = None
        if locations.is_url(src.path):  # an object or a URL: its bytes come through the fetcher
            try:
                data = await self._fetcher().read(src)
            except FetchError as exc:
                return ImageItem(source=src, error=str(exc), retryable=exc.retryable), None
        images_config = self.config.images
        preparation = images.Preparation(
            src, max_side=images_config.max_side, verify=images_config.verify, data=data
        )
        with preparation:
            big = src.size > SMALL_FILE
            await offload(big, preparation.start)
            if preparation.item is not None:  # nothing to decode: sent as it is, or an error
                return preparation.item, data
            size = preparation.decode_bytes
            async with self.decodes.admitted(size):
                return await offload(big or size > SMALL_DECODE, preparation.finish), data


def sizes_of(unit: Unit) -> list[tuple[int, int]]:
    """Displayed (width, height) of every member of a unit (one for a lone file)."""
    return [(item.width, item.height) for item in unit.items]


def unit_of(items: tuple[ImageItem, ...], group: SourceGroup | None) -> Unit:
    """A unit of prepared items: its sha256 (the file's, or the group's when every member was
    read) and its error (a lone file's own, or the first failed member's, named)."""
    failed = next((item for item in items if item.error), None)
    if group is None:
        return Unit.lone(items[0])
    error = f"{failed.source.rel_path}: {failed.error}" if failed is not None else None
    shas = [item.sha256 for item in items]
    return Unit(items, group, group_sha256(shas) if all(shas) else "", error)
