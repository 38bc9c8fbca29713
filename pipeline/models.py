"""What each Gemini model takes, bills and answers: the one place the pipeline knows models.

The facts live in `models.json` beside this module (each entry names its source); this module
reads them into `Model` values and answers "which entry is this model id?". Tasks (thinking,
temperature, schema form), token rules, `estimate` (prices), the request builder (media
resolution) and the local server (what it accepts and how it answers segmentation) all ask here,
so a new model is one JSON entry — or, for a user, one `[models."id"]` table in a config.

Matching: aliases first (`gemini-flash-latest` -> `gemini-3.8-flash`), then the entry whose
`match` prefix is the longest prefix of the id (`gemini-2.5-flash-lite-preview-09-2025` ->
`gemini-2.5-flash-lite`, not `gemini-2.5-flash`). An id that matches nothing gets `UNKNOWN`'s
conservative settings — no thinking setting, no media resolution, the OpenAPI schema subset,
no temperature — and one warning per id, because sending a setting a model refuses fails every
request of a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from importlib import resources
from typing import Any, Literal

from pipeline import settings as s

log = logging.getLogger(__name__)

# in increasing order of thought; `xhigh` is in the SDK's ThinkingLevel (google-genai 3.6
# types.py) though no page yet names a model taking it: a config's [models] entry can list it
THINKING_LEVELS = ("minimal", "low", "medium", "high", "xhigh")
MEDIA_RESOLUTIONS = ("low", "medium", "high", "ultra_high")
GLOBAL_MEDIA_RESOLUTIONS = ("low", "medium", "high")  # ultra_high exists per image part only
TOKEN_RULES = ("tiles_1_5", "tiles", "budget")
MASK_SHAPES = ("png", "polygon")
ThinkingControl = Literal["none", "budget", "level"]


class ModelTableError(ValueError):
    """A model entry (the data file's or a config's) that cannot be used; names the field."""


@dataclass(frozen=True, slots=True)
class Thinking:
    """How a model's thinking is set: not at all, by a token budget (2.5), or by a level (3.x)."""

    control: ThinkingControl = "none"
    levels: tuple[str, ...] = ()  # level control: accepted levels, lowest first
    min: int | None = None  # budget control: the smallest budget that turns thinking on
    max: int | None = None
    off: bool = False  # budget control: 0 (thinking off) is accepted
    default: str | None = None  # what the service does when the request sets nothing

    def lowest(self) -> tuple[int | None, str | None]:
        """(budget, level) for "as little thinking as the model allows" (the spatial default)."""
        if self.control == "budget":
            return (0 if self.off else self.min), None
        if self.control == "level":
            return None, self.levels[0]
        return None, None

    def level_error(self, level: str) -> str | None:
        """Why `level` is refused (the service's wording), or None when it is accepted."""
        if self.control != "level":
            return "this model takes no thinking level" + _budget_hint(self)
        if level not in self.levels:
            # the order of the live message ("Allowed values are: medium, low, high.")
            shown = sorted(
                self.levels, key=lambda name: (name != "medium", self.levels.index(name))
            )
            allowed = ", ".join(shown)
            return (
                f"'{level}' is not a supported thinking level for this model. "
                f"Allowed values are: {allowed}."
            )
        return None

    def budget_error(self, budget: int) -> str | None:
        """Why `budget` is refused, or None. -1 (dynamic) is accepted wherever budgets are.

        A level model takes a budget too: the thinking page (updated 2026-09-04) calls a numeric
        `thinkingBudget` on Gemini 3 "no longer recommended", not refused (`budget_warning`)."""
        if self.control == "level":
            return None if budget >= -1 else f"The thinking budget {budget} is invalid."
        if self.control != "budget":
            return "this model takes no thinking budget" + _level_hint(self)
        if budget == -1 or (budget == 0 and self.off):
            return None
        assert self.min is not None and self.max is not None
        if not self.min <= budget <= self.max:
            zero = "0 (off), " if self.off else ""
            return (
                f"The thinking budget {budget} is invalid. This model only supports thinking "
                f"budgets in the range [{self.min}, {self.max}] ({zero}-1 for dynamic)."
            )
        return None

    def budget_warning(self) -> str | None:
        """What to tell a user who sets a budget on a level model (accepted, discouraged)."""
        if self.control != "level":
            return None
        return (
            "a numeric thinking budget on this model is no longer recommended (thinking page, "
            f"updated 2026-09-04); thinking_level ({', '.join(self.levels)}) is the documented "
            "control"
        )

    def describe(self) -> str:
        if self.control == "level":
            return "level " + "/".join(self.levels)
        if self.control == "budget":
            return f"budget {'0 or ' if self.off else ''}{self.min}-{self.max}"
        return "none"


def _budget_hint(thinking: Thinking) -> str:
    return " (it takes a thinking budget)" if thinking.control == "budget" else ""


def _level_hint(thinking: Thinking) -> str:
    if thinking.control == "level":
        return f" (it takes a thinking level: {', '.join(thinking.levels)})"
    return ""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens for one period; output includes thinking. Batch Mode bills its own.

    `cached_input` is what a prompt token served from the implicit cache costs
    (`usageMetadata.cachedContentTokenCount`, a part of the prompt count). `long` is the tier
    that applies to the whole request when its prompt has more than `long_above` tokens (the Pro
    models' "prompts > 200k tokens" prices)."""

    input: float
    output: float
    batch_input: float
    batch_output: float
    until: date | None = None  # the last day (UTC) this price applies; None: open-ended
    cached_input: float | None = None  # None: billed as input (no discount assumed)
    batch_cached_input: float | None = None  # None: the interactive cached rate
    # USD per 1M tokens a cached content (cachedContents) holds, per hour it is stored; None:
    # no page gives it, so caching cannot be shown to pay (`[api] context_cache = "auto"`)
    cache_storage: float | None = None
    long: Price | None = None
    long_above: int | None = None

    def tier(self, prompt_tokens: float) -> Price:
        """The tier billing a request of `prompt_tokens` (this one or its long-prompt tier)."""
        above = self.long_above
        if self.long is not None and above is not None and prompt_tokens > above:
            return self.long
        return self

    def cost(
        self,
        prompt_tokens: float,
        output_tokens: float,
        *,
        cached_tokens: float = 0,
        batch: bool = False,
    ) -> float:
        """USD of one request (or of several of the same tier: the sums are linear)."""
        rates = self.tier(prompt_tokens)
        return rates.flat_cost(prompt_tokens, output_tokens, cached_tokens, batch=batch)

    def flat_cost(
        self, prompt_tokens: float, output_tokens: float, cached_tokens: float, *, batch: bool
    ) -> float:
        """USD at this tier's rates, whatever the prompt's size."""
        rate_in, rate_out = (
            (self.batch_input, self.batch_output) if batch else (self.input, self.output)
        )
        rate_cached = self.cached_rate(batch=batch)
        cached = min(max(cached_tokens, 0), prompt_tokens)
        uncached = prompt_tokens - cached
        return (uncached * rate_in + cached * rate_cached + output_tokens * rate_out) / 1e6

    def cached_rate(self, *, batch: bool = False) -> float:
        base = self.batch_input if batch else self.input
        cached = self.batch_cached_input if batch else None
        return next(r for r in (cached, self.cached_input, base) if r is not None)


@dataclass(frozen=True, slots=True)
class Status:
    """Whether a model can still be called: available, or shut down on a day (the deprecations
    page), with the model the page names as its replacement."""

    shut_down: date | None = None
    replacement: str | None = None

    def is_shut_down(self, on: date | None = None) -> bool:
        day = on or datetime.now(UTC).date()
        return self.shut_down is not None and day >= self.shut_down

    def describe(self) -> str:
        if self.shut_down is None:
            return "available"
        instead = f", use {self.replacement}" if self.replacement else ""
        return f"shut down {self.shut_down.isoformat()}{instead}"


@dataclass(frozen=True, slots=True)
class Model:
    """One entry of the table. `known` is False for the conservative stand-in of an unknown id."""

    name: str
    match: tuple[str, ...]
    generation: str  # "1.5", "2.0", "2.5", "3", "3.1", ...
    tokens: str  # one of TOKEN_RULES
    thinking: Thinking
    temperature: float | None  # recommended for spatial work; None: the service default
    segmentation: str | None  # mask shape answered: "png", "polygon", or None (no masks)
    mask_schema: bool  # masks come by sending the {"boxes": [...]} response schema (3.x pages)
    json_schema: bool  # generationConfig.responseJsonSchema (full JSON Schema) accepted
    media_resolution: tuple[str, ...]  # levels of the global generationConfig.mediaResolution
    part_media_resolution: tuple[str, ...]  # API versions taking a per-image resolution
    interactions: bool  # served by the Interactions API
    batch: bool  # served by Batch Mode
    # the fewest tokens a cached content may hold (the caching page's minimum, which the
    # implicit cache shares); None: the model caches nothing
    cache_min_tokens: int | None = None
    prices: tuple[Price, ...] = ()
    status: Status = Status()
    sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # fact -> claims
    known: bool = True

    @property
    def source(self) -> str:
        """Every fact's claims on one line (what `pipeline models --sources` prints)."""
        return "; ".join(f"{k}: {' | '.join(v)}" for k, v in self.sources.items())

    def price(self, on: date | None = None) -> Price | None:
        """The price that applies on `on` (today, UTC, by default); None when none is known."""
        day = on or datetime.now(UTC).date()
        for period in self.prices:
            if period.until is None or day <= period.until:
                return period
        return self.prices[-1] if self.prices else None

    def part_resolution_on(self, version: str) -> bool:
        """Whether a per-image media resolution is accepted on this API version."""
        return version in self.part_media_resolution


UNKNOWN = Model(
    name="(unknown model)",
    match=(),
    generation="unknown",
    tokens="tiles",
    thinking=Thinking(),
    temperature=None,
    segmentation="png",
    mask_schema=False,
    json_schema=False,
    media_resolution=(),
    part_media_resolution=(),
    interactions=True,
    batch=True,
    sources={"entry": ("no entry matches: conservative settings (nothing it might refuse)",)},
    known=False,
)


@dataclass(frozen=True, slots=True)
class ModelTable:
    """The entries and aliases, with a config's additions merged in."""

    models: tuple[Model, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    # alias -> where its target comes from; no page states what an alias points to today, so
    # the data file's targets are guesses a preflight (models.get) may correct
    alias_sources: Mapping[str, str] = field(default_factory=dict)

    def alias_target(self, model_id: str) -> str | None:
        """The entry an alias stands for in this table, or None when `model_id` is no alias."""
        return self.aliases.get(model_id.removeprefix("models/").strip().lower())

    def names(self) -> list[str]:
        """Every id a user can write: entry names and aliases (for "did you mean")."""
        return [m.name for m in self.models] + sorted(self.aliases)

    def lookup(self, model_id: str) -> Model:
        """The entry for `model_id` (aliases first, then the longest `match` prefix)."""
        name = model_id.removeprefix("models/").strip().lower()
        name = self.aliases.get(name, name).lower()
        best: Model | None = None
        best_length = -1
        for entry in self.models:
            for prefix in entry.match:
                if name.startswith(prefix) and len(prefix) > best_length:
                    best, best_length = entry, len(prefix)
        if best is None:
            _warn_unknown(model_id, self.names())
            return dataclasses.replace(UNKNOWN, name=name)
        return best

    def is_known(self, model_id: str) -> bool:
        name = model_id.removeprefix("models/").strip().lower()
        name = self.aliases.get(name, name).lower()
        return any(name.startswith(p) for entry in self.models for p in entry.match)

    def entry(self, name: str) -> Model | None:
        """The entry named exactly `name` (not matched by prefix)."""
        return next((m for m in self.models if m.name == name), None)

    def with_entries(self, tables: Mapping[str, Any]) -> ModelTable:
        """This table plus user entries (`[models."id"]`): each may start `like` an entry."""
        models = list(self.models)
        for name, table in tables.items():
            base = self._base_for(name, table)
            entry = parse_entry(name, table, base)
            models = [m for m in models if m.name != entry.name] + [entry]
        return ModelTable(tuple(models), self.aliases, self.alias_sources)

    def _base_for(self, name: str, table: Any) -> Model | None:
        if not isinstance(table, Mapping):
            raise ModelTableError("must be a table")
        like = table.get("like")
        if like is None:
            return self.entry(name)
        if not isinstance(like, str) or self.entry(like) is None:
            names = ", ".join(m.name for m in self.models)
            raise ModelTableError(f"like must name an entry of the table ({names}), got {like!r}")
        return self.entry(like)


_warned: set[str] = set()


def did_you_mean(model_id: str, names: Iterable[str]) -> str:
    """ " (did you mean X?)" for the closest of `names` to a mistyped id, else "": a typo in
    [api] model is the likeliest reason an id matches nothing."""
    name = model_id.removeprefix("models/").strip().lower()
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _warn_unknown(model_id: str, names: Iterable[str]) -> None:
    if model_id not in _warned:
        _warned.add(model_id)
        log.warning(
            "model %r matches no entry of the model table%s: sending no thinking, media "
            "resolution or temperature setting (add it under [models.%s] to say what it takes)",
            model_id,
            did_you_mean(model_id, names),
            json.dumps(model_id),
        )


# ---------------------------------------------------------------------------- the data file
ENTRY_FIELDS = (
    "like",
    "match",
    "generation",
    "tokens",
    "thinking",
    "temperature",
    "segmentation",
    "mask_schema",
    "json_schema",
    "media_resolution",
    "part_media_resolution",
    "interactions",
    "batch",
    "cache_min_tokens",
    "prices",
    "status",
    "sources",
    "source",
)
_REQUIRED = ("generation", "tokens", "thinking")


def parse_entry(name: str, table: Mapping[str, Any], base: Model | None = None) -> Model:
    """A model entry from JSON or TOML; fields missing here come from `base` (its `like`)."""
    unknown = set(table) - set(ENTRY_FIELDS) - {"name"}
    if unknown:
        raise ModelTableError(
            f"unknown field {sorted(unknown)[0]} (known: {', '.join(ENTRY_FIELDS)})"
        )
    if base is None:
        missing = [key for key in _REQUIRED if key not in table]
        if missing:
            raise ModelTableError(f"{missing[0]} is required (or start from an entry with like)")
    start = base or dataclasses.replace(UNKNOWN, known=True, sources={})
    values: dict[str, Any] = {"name": name, "match": (name.lower(),)}
    for key, read in _READERS.items():
        if key in table:
            values[key] = _read(key, read, table[key])
    if base is not None and "match" not in table:
        values["match"] = (name.lower(),)
    if "source" in table:  # a config's entry: one line for the whole entry
        values["sources"] = {"entry": (_read("source", s.text, table["source"]),)}
    return dataclasses.replace(start, **values)


def _read(key: str, read: Any, value: Any) -> Any:
    """Each reader raises TypeError with what the value must be (pipeline/settings.py's rule)."""
    try:
        return read(value)
    except (TypeError, ValueError) as exc:
        raise ModelTableError(f"{key} must be {exc}") from None


def _strings(value: Any, choices: Iterable[str] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list):  # TOML and JSON give lists; a lone string is a mistake here
        raise TypeError("a list of strings")
    items = s.texts(value)
    if choices is not None:
        for item in items:
            s.one_of(*choices)(item)
    return items


def _thinking(value: Any) -> Thinking:
    if not isinstance(value, Mapping):
        raise TypeError("a table with control = none | budget | level")
    control = value.get("control")
    if control == "none":
        return Thinking()
    if control == "level":
        levels = _strings(value.get("levels"), THINKING_LEVELS)
        if not levels:
            raise TypeError("a table whose levels are not empty")
        ordered = tuple(sorted(levels, key=THINKING_LEVELS.index))
        return Thinking("level", levels=ordered, default=_default(value, ordered))
    if control == "budget":
        low, high = s.positive_int(value.get("min")), s.positive_int(value.get("max"))
        if low > high:
            raise TypeError("a table with min <= max")
        off = s.flag(value.get("off", False))
        return Thinking("budget", min=low, max=high, off=off, default=_default(value, None))
    raise TypeError("a table with control = none | budget | level")


def _default(value: Mapping[str, Any], levels: tuple[str, ...] | None) -> str | None:
    """The service's own default (a level, or "dynamic" for a budget model), informative."""
    default = value.get("default")
    if default is None:
        return None
    return s.one_of(*(levels or ("dynamic",)))(default)


def _prices(value: Any) -> tuple[Price, ...]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise TypeError("a list of {input, output[, until, batch_input, batch_output]}")
    return tuple(_price(item) for item in value)


def _price(item: Any) -> Price:
    if not isinstance(item, Mapping):
        raise TypeError("a list of tables")
    rates = _rates(item)
    long = item.get("long")
    above = None
    if long is not None:
        if not isinstance(long, Mapping):
            raise TypeError("prices whose long is a table {above, input, output, ...}")
        above = s.positive_int(long.get("above"))
        long = Price(**_rates(long))
    until = item.get("until")
    if until is not None:
        until = date.fromisoformat(str(until))
    return Price(**rates, until=until, long=long, long_above=above)


def _rates(item: Mapping[str, Any]) -> dict[str, Any]:
    """A period's (or tier's) rates; batch_* default to half, cached ones to None (see Price)."""
    numbers: dict[str, Any] = {}
    for key in ("input", "output", "batch_input", "batch_output"):
        number = item.get(key)
        if number is None and key.startswith("batch_"):
            number = numbers[key.removeprefix("batch_")] / 2  # Batch Mode: half the price
        numbers[key] = _rate(key, number)
    for key in ("cached_input", "batch_cached_input", "cache_storage"):
        value = item.get(key)
        numbers[key] = None if value is None else _rate(key, value)
    return numbers


def _rate(key: str, number: Any) -> float:
    try:
        return s.non_negative_number(number)
    except TypeError:
        raise TypeError(f"prices whose {key} is a number >= 0") from None


def _status(value: Any) -> Status:
    if not isinstance(value, Mapping) or set(value) - {"shut_down", "replacement"}:
        raise TypeError("a table {shut_down = YYYY-MM-DD, replacement = model}")
    day = value.get("shut_down")
    replacement = value.get("replacement")
    return Status(
        shut_down=None if day is None else date.fromisoformat(str(day)),
        replacement=None if replacement is None else s.text(replacement),
    )


def _sources(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError("a table fact -> [claim, ...]")
    return {str(fact): _strings(claims) for fact, claims in value.items()}


_READERS: dict[str, Any] = {
    "match": lambda v: tuple(p.lower() for p in _strings(v)),
    "generation": s.text,
    "tokens": s.one_of(*TOKEN_RULES),
    "thinking": _thinking,
    "temperature": s.optional(s.between(0, 2)),
    "segmentation": s.optional(s.one_of(*MASK_SHAPES)),
    "mask_schema": s.flag,
    "json_schema": s.flag,
    "media_resolution": lambda v: _strings(v, GLOBAL_MEDIA_RESOLUTIONS),
    "part_media_resolution": _strings,
    "interactions": s.flag,
    "batch": s.flag,
    "cache_min_tokens": s.optional(s.positive_int),
    "prices": _prices,
    "status": _status,
    "sources": _sources,
}


@cache
def default_table() -> ModelTable:
    """The table in `models.json` (read once)."""
    text = resources.files("pipeline").joinpath("models.json").read_text(encoding="utf-8")
    document = json.loads(text)
    models = []
    for entry in document["models"]:
        try:
            models.append(parse_entry(entry["name"], entry))
        except ModelTableError as exc:
            raise ModelTableError(f"models.json: {entry.get('name')}: {exc}") from None
    aliases = {k.lower(): v["target"] for k, v in document.get("aliases", {}).items()}
    sources = {k.lower(): v["source"] for k, v in document.get("aliases", {}).items()}
    return ModelTable(tuple(models), aliases, sources)


def lookup(model_id: str, table: ModelTable | None = None) -> Model:
    """The entry for `model_id` in `table` (the default table when None)."""
    return (table or default_table()).lookup(model_id)


def describe_table(table: ModelTable | None = None, *, on: date | None = None) -> list[str]:
    """The table as `pipeline models` prints it: one line per entry, then the aliases."""
    table = table or default_table()
    header = ["model", "gen", "tokens", "thinking (lowest first)", "temp", "masks", "schema"]
    header += ["media resolution", "APIs", "USD/1M in, out", "status"]
    rows = [header] + [_describe(m, on) for m in table.models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines += [
        f"alias {alias} -> {target} ({table.alias_sources.get(alias, 'from a config')})"
        for alias, target in sorted(table.aliases.items())
    ]
    lines.append("APIs: gc generateContent, i Interactions, b Batch Mode; +part(v): per-image")
    lines.append("masks: png | polygon (+schema: sent as a response schema); >Nk: long-prompt tier")
    lines.append("`pipeline models --sources`: the dated claims behind every fact")
    return lines


def describe_sources(table: ModelTable | None = None) -> list[str]:
    """Every entry's facts with their claims (dated, or marked assumed), as `--sources` prints."""
    lines = []
    for model in (table or default_table()).models:
        lines.append(model.name)
        for fact, claims in model.sources.items():
            lines += [f"  {fact}: {claim}" for claim in claims]
    return lines


def _describe(m: Model, on: date | None) -> list[str]:
    price = m.price(on)
    media = "/".join(m.media_resolution) or "-"
    if m.part_media_resolution:
        media += f" +part({','.join(m.part_media_resolution)})"
    return [
        m.name,
        m.generation,
        m.tokens,
        m.thinking.describe(),
        "-" if m.temperature is None else f"{m.temperature:g}",
        (m.segmentation or "-") + ("+schema" if m.mask_schema else ""),
        "json" if m.json_schema else "openapi",
        media,
        "gc" + ("+i" if m.interactions else "") + ("+b" if m.batch else ""),
        _describe_price(price),
        m.status.describe(),
    ]


def _describe_price(price: Price | None) -> str:
    if price is None:
        return "-"
    text = f"{price.input:g}, {price.output:g}"
    if price.until is not None:
        text += f" to {price.until.isoformat()}"
    if price.long is not None and price.long_above is not None:
        text += f"; >{price.long_above // 1000}k {price.long.input:g}, {price.long.output:g}"
    return text
