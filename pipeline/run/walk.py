"""The walk of a run: each unit of its inputs in order, those it would not buy skipped. One
generator for the run's Producer (pipeline/engines/common.py, in its walking thread) and for the
plan of a run (pipeline/run/plan.py), so the plan sees exactly what the run would do.

    work_units (the inputs, the output folder never entered) ─► at the limit or halted? end
      ─► committed (the resume index)? DONE ─► in a Batch Mode job in flight? IN_FLIGHT
      ─► collected by this run from a job (after the index was read)? DONE ─► else: yielded

The skipped units are counted here and handed to `on_skip` (the plan lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.config import Config
from pipeline.inputs.fetch import Fetcher
from pipeline.inputs.source import PassedOver, work_units
from pipeline.output.index import DoneOrInFlight
from pipeline.records import Work, resumable, work_identity

DONE, IN_FLIGHT = "done", "in_flight"


class Walk:
    """A run's walk of `config`'s inputs (the module docstring): `limit`, at most that many
    units yielded; `passed` counts the files the include patterns pass over."""

    def __init__(
        self,
        config: Config,
        done_test: DoneOrInFlight,
        fetcher: Fetcher,
        limit: int | None = None,
        passed: PassedOver | None = None,
    ) -> None:
        self.config, self.done_test, self.fetcher = config, done_test, fetcher
        self.limit, self.passed = limit, passed
        self.seen = self.done = self.in_flight = 0
        self.halted: Callable[[], bool] = lambda: False  # the run stopped: the walk ends
        self.on_skip: Callable[[str, Work], object] = lambda why, work: None

    @property
    def skipped(self) -> int:
        return self.done + self.in_flight

    def units(self) -> Iterator[Work]:
        """The units to buy, in the walk's order (objects' and manifest URLs' versions asked
        by the fetcher as the run asks them)."""
        taken = 0
        config = self.config
        resolve, passed = self.fetcher.resolve, self.passed
        walk = work_units(config.input, skip=(config.output.dir,), resolve=resolve, passed=passed)
        for work in walk:
            if self.halted() or (self.limit is not None and taken >= self.limit):
                return
            self.seen += 1
            if (why := self._skip(work)) is not None:
                self.on_skip(why, work)
                continue
            taken += 1
            yield work

    def _skip(self, work: Work) -> str | None:
        """Why the run would not buy `work` (DONE, IN_FLIGHT), or None."""
        if not resumable(work):
            return None
        identity = work_identity(work)
        test = self.done_test
        if test.index.is_done(*identity):  # first: most files of a rerun, no fingerprint made
            return self._done()
        if test.in_job(*identity):  # (before `collected`, which holds the jobs still running)
            self.in_flight += 1
            return IN_FLIGHT
        if test.collected_by_run(*identity):
            return self._done()
        return None

    def _done(self) -> str:
        self.done += 1
        return DONE
