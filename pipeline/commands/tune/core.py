"""`pipeline tune`: the cheapest setting whose answers agree with the richest one's.

The experiment: a seeded sample of the config's inputs (sample.py), run under a reference
setting and under every combination of the varied values (grid.py), each into its own output
under `OUT/_tune/<setting>`, through the normal engine handed in as `runner` (so resume, the
journal and the spending caps hold as in any run: a rerun after a kill pays only for what was
not answered). Each output is compared with the reference's (`compare_outputs`); the setting
recommended is the cheapest, by what its rows were billed, whose agreement reaches the target
(relative to the reference's agreement with itself when the reference is repeated).

Before any call the whole experiment is priced by `pipeline estimate`'s own function (every
setting over the sample, interactive and in Batch Mode); past `max_usd` nothing is run. While
it runs, each run gets the budget left as its `[limits] max_usd`, so the engine holds the cap
request by request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline import exits
from pipeline.commands.compare import compare_outputs
from pipeline.commands.estimate import estimate
from pipeline.commands.tune.grid import Setting, combinations, reference_setting
from pipeline.commands.tune.sample import Sample, sample_of
from pipeline.config import Config, ConfigError, require_available
from pipeline.config import with_overrides as apply_overrides
from pipeline.cost import table_cost
from pipeline.output.parts import current_rows
from pipeline.output.stores import open_store
from pipeline.records import USAGE_COLUMNS
from pipeline.run.plan import COPY, Hashes
from pipeline.run.summary import RunSummary

TUNE_DIR = "_tune"
PROJECTION = ".projection"  # the empty output a setting's whole input is planned into
SOURCE = "tune"  # where the values tune sets itself are said to come from in an error
BILL_COLUMNS = ("model", "input_mode", "completed_at", *USAGE_COLUMNS)
Runner = Callable[[Config, str], RunSummary]  # a config's run, and what to call it in messages


class TuneError(ConfigError):
    """A tune that cannot run as asked (a bad target, repeat or sample): a usage error."""


@dataclass(frozen=True, slots=True)
class TuneOptions:
    sample: int
    vary: Mapping[str, tuple[Any, ...]]  # checked values by "section.key" (grid.parse_vary)
    reference: Mapping[str, Any] = field(default_factory=dict)  # grid.parse_reference
    target: float = 0.95
    max_usd: float | None = None
    repeat: int = 1
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.target <= 1:
            raise TuneError(f"--target must be above 0 and at most 1, got {self.target}")
        if self.repeat < 1:
            raise TuneError(
                f"--repeat must be 1 or more (runs of the reference), got {self.repeat}"
            )
        if self.max_usd is not None and self.max_usd <= 0:
            raise TuneError(f"--max-usd must be above 0, got {self.max_usd}")


@dataclass(slots=True)
class Trial:
    """One output of the experiment: a setting run over the sample."""

    setting: Setting
    role: str  # reference | repeat | candidate
    output: str
    whole: Config  # the setting over the config's whole input (its projection), output here
    config: Config  # the same over the sample: what is run
    price: dict[str, float | None]  # the sample at this setting: cost_usd, batch_cost_usd
    summary: RunSummary | None = None
    agreement: float | None = None
    compared: int = 0
    cost_per_1000: float | None = None
    projected: dict[str, Any] | None = None
    qualifies: bool = False

    def as_dict(self) -> dict[str, Any]:
        run = self.summary
        return {
            "setting": self.setting.as_dict(),
            "label": self.setting.label,
            "slug": self.setting.slug,
            "role": self.role,
            "output": self.output,
            "agreement": self.agreement,
            "images_compared": self.compared,
            "cost_per_1000_usd": self.cost_per_1000,
            "projected": self.projected,
            "qualifies": self.qualifies,
            "sample_estimate": self.price,
            "run": None
            if run is None
            else {"api_calls": run.api_calls, "cost_usd": run.cost_usd, "exit_code": run.exit_code},
        }


@dataclass(slots=True)
class TuneReport:
    config: str
    folder: str
    sample: Sample
    options: TuneOptions
    trials: list[Trial]
    price: dict[str, Any]
    noise_floor: float | None = None
    recommended: Trial | None = None
    spent_usd: float = 0.0
    stop_reason: str | None = None
    exit_code: int = exits.OK

    @property
    def threshold(self) -> float:
        """The agreement a setting must reach: the target, scaled by the noise floor when the
        reference was repeated (a setting cannot agree with a noisy reference better than the
        reference agrees with itself)."""
        floor = 1.0 if self.noise_floor is None else self.noise_floor
        return self.options.target * floor

    def as_dict(self) -> dict[str, Any]:
        sample = self.sample
        return {
            "config": self.config,
            "folder": self.folder,
            "sample": {
                "manifest": sample.manifest,
                "seed": sample.seed,
                "size": sample.size,
                "images": sample.images,
            },
            "target": self.options.target,
            "noise_floor": self.noise_floor,
            "threshold": self.threshold,
            "price": self.price,
            "settings": [trial.as_dict() for trial in self.trials],
            "recommendation": _recommendation(self.recommended),
            "spent_usd": round(self.spent_usd, 6),
            "stop_reason": self.stop_reason,
            "exit_code": self.exit_code,
        }


def _recommendation(best: Trial | None) -> dict[str, Any] | None:
    if best is None:
        return None
    return {
        "setting": best.setting.as_dict(),
        "label": best.setting.label,
        "slug": best.setting.slug,
        "agreement": best.agreement,
        "cost_per_1000_usd": best.cost_per_1000,
        "snippet": best.setting.snippet(),
    }


def tune(config: Config, options: TuneOptions, runner: Runner) -> TuneReport:
    """Price, run, compare and recommend (the module's docstring); `runner` runs one config
    as `pipeline run` does and returns its summary."""
    options.check()
    folder = open_store(open_store(config.output.dir).join(TUNE_DIR))
    planned = _plan(config, options, folder.join)  # usage errors before anything is written
    sample = sample_of(config, folder, options.sample, options.seed)
    # each setting's plan reads the same files: each is read whole (hashed) once, not per setting
    hashes = Hashes(remember=True)
    trials = [_trial(*plan, sample, hashes) for plan in planned]
    price = _price(config, trials, options.max_usd)
    report = TuneReport(config.source, folder.url, sample, options, trials, price)
    if _over_cap(report):
        return report
    _run_all(report, runner)
    if report.stop_reason is None:
        _compare_all(report, hashes)
    return report


# ------------------------------------------------------------------------------ the trials
Plan = tuple[Setting, str, str, Config]  # setting, role, output, config over the whole input


def _plan(config: Config, options: TuneOptions, place: Callable[[str], str]) -> list[Plan]:
    """The reference (and its repeats) first, then every other combination, each config
    built: a value that does not go with another (a thinking level on a 2.5 model) or a model
    the service has shut down is a ConfigError before anything is drawn, priced or run."""
    reference = reference_setting(options.vary, options.reference, config)
    named = [(reference, "reference", reference.slug)]
    named += [
        (reference, "repeat", f"{reference.slug}.repeat{n}") for n in range(2, options.repeat + 1)
    ]
    named += [(s, "candidate", s.slug) for s in combinations(options.vary) if s != reference]
    plans = []
    for setting, role, name in named:
        output = place(name)
        whole = apply_overrides(setting.applied(config), {"output.dir": output}, SOURCE)
        require_available(whole)  # a shut-down model would fail at its run, after the draw
        plans.append((setting, role, output, whole))
    return plans


def _trial(
    setting: Setting, role: str, output: str, whole: Config, sample: Sample, hashes: Hashes
) -> Trial:
    """A planned setting over the sample, priced by the estimate."""
    run_config = _on_sample(whole, sample)
    price = _prices(estimate(run_config, hashes=hashes))
    return Trial(setting, role, output, whole, run_config, price)


def _on_sample(config: Config, sample: Sample) -> Config:
    """The sample's manifest in place of the config's inputs (folders, or its own manifest)."""
    return apply_overrides(config, {"input.manifest": sample.manifest, "input.paths": ()}, SOURCE)


def _prices(report: Mapping[str, Any]) -> dict[str, float | None]:
    return {"cost_usd": report["cost_usd"], "batch_cost_usd": report["batch_cost_usd"]}


def _price(config: Config, trials: list[Trial], cap: float | None) -> dict[str, Any]:
    """The whole experiment, every trial over the sample, at today's prices (None: a model the
    table has no price for), and the cap it is held to."""
    total: dict[str, Any] = {"runs": len(trials), "mode": config.api.mode, "max_usd": cap}
    for key in ("cost_usd", "batch_cost_usd"):
        costs = [trial.price[key] for trial in trials]
        total[key] = None if None in costs else round(sum(c or 0.0 for c in costs), 6)
    return total


def _over_cap(report: TuneReport) -> bool:
    """Past `max_usd` at the price of the mode the runs will use: stop before any call."""
    cap = report.options.max_usd
    cost = report.price["batch_cost_usd" if report.price["mode"] == "batch" else "cost_usd"]
    if cap is None:
        return False
    if cost is None:  # as `run` refuses a cap it cannot keep
        raise TuneError("--max-usd: a model of the experiment has no price in the model table")
    if cost <= cap:
        return False
    report.stop_reason = (
        f"the experiment is estimated at ${cost:,.4f} ({report.price['runs']} runs of "
        f"{report.sample.images} images), over --max-usd ${cap:,.4f}: nothing was run"
    )
    report.exit_code = exits.STOPPED
    return True


# -------------------------------------------------------------------------------- the runs
def _run_all(report: TuneReport, runner: Runner) -> None:
    """Each trial in turn, within what is left of the cap; a run that stops stops the tune
    (rerun it to resume: what was answered is kept)."""
    for trial in report.trials:
        left = _budget_left(report)
        if left is not None and left <= 0:
            report.stop_reason = f"--max-usd ${report.options.max_usd:,.4f} spent"
            report.exit_code = exits.STOPPED
            return
        trial.summary = runner(_capped(trial.config, left), trial.setting.label)
        report.spent_usd += trial.summary.cost_usd + trial.summary.abandoned_est_usd
        report.exit_code = max(report.exit_code, trial.summary.exit_code)
        if trial.summary.stop_reason:
            report.stop_reason = f"{trial.setting.label}: {trial.summary.stop_reason}"
            return


def _budget_left(report: TuneReport) -> float | None:
    cap = report.options.max_usd
    return None if cap is None else cap - report.spent_usd


def _capped(config: Config, left: float | None) -> Config:
    """The run's own `[limits] max_usd`, lowered to what the tune has left."""
    if left is None:
        return config
    own = config.limits.max_usd
    return apply_overrides(config, {"limits.max_usd": min(left, own or left)}, SOURCE)


# -------------------------------------------------------------------- comparing, choosing
def _compare_all(report: TuneReport, hashes: Hashes) -> None:
    reference = report.trials[0]
    for trial in report.trials:
        trial.cost_per_1000 = _cost_per_1000(trial.output, trial.config)
        if trial.role != "reference":
            compared = compare_outputs(reference.output, trial.output)
            trial.agreement, trial.compared = compared.agreement, len(compared.images)
    repeats = [t.agreement for t in report.trials if t.role == "repeat"]
    if repeats:
        report.noise_floor = sum(a or 0.0 for a in repeats) / len(repeats)
    reference.agreement, reference.compared = 1.0, report.sample.images
    _project(report, hashes)
    _recommend(report)


def _cost_per_1000(output: str, config: Config) -> float | None:
    """What the sample's current rows were billed, per 1,000 images (None: unpriced rows)."""
    rows = current_rows(output, BILL_COLUMNS)
    bill = table_cost(rows, config.models)
    if bill["unpriced_rows"] or rows.num_rows == 0:
        return None
    return round(bill["usd"] / rows.num_rows * 1000, 6)


def _project(report: TuneReport, hashes: Hashes) -> None:
    """The whole input at each setting as a first run would buy it, by the estimate: planned
    into an output that holds nothing (never created: the estimate writes nothing), since the
    setting's own output already holds the sample's rows, which a plan would count as done;
    its output tokens learnt from those rows."""
    for trial in report.trials:
        if trial.role == "repeat":
            continue
        first_run = apply_overrides(trial.whole, {"output.dir": trial.output + PROJECTION}, SOURCE)
        found = estimate(first_run, history_from=trial.output, hashes=hashes)
        copies = found["plan"]["categories"][COPY]["images"]  # twins: in the input, free
        trial.projected = {"images": found["images"] + copies, **_prices(found)}


def _recommend(report: TuneReport) -> None:
    """The cheapest (by the billed cost per 1,000, then the projected cost) of the settings
    whose agreement reaches the threshold; the reference always does."""
    for trial in report.trials:
        trial.qualifies = trial.role == "reference" or (
            trial.role == "candidate"
            and trial.agreement is not None
            and trial.agreement >= report.threshold
        )
    chosen = [trial for trial in report.trials if trial.qualifies]
    report.recommended = min(chosen, key=_cheapness, default=None)


def _cheapness(trial: Trial) -> tuple[bool, float, bool, float]:
    projected = (trial.projected or {}).get("cost_usd")
    return (
        trial.cost_per_1000 is None,
        trial.cost_per_1000 or 0.0,
        projected is None,
        projected or 0.0,
    )
