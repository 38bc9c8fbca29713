"""The settings `pipeline tune` tries: `--vary KEY=V1,V2` parsed and checked by the config's own
declarations, their combinations, the reference ("the richest"), and each one's folder name and
config snippet.

A KEY is a config key as the TOML file spells it, `section.key` (`images.max_side`,
`api.model`, `task.media_resolution`, `task.thinking_level`), and every value is checked by
that key's declaration (pipeline/config.py), so a wrong key or value is the same `ConfigError`,
naming the key, that the config file would get. A value is read as a TOML value (`48`,
`"high"`, `true`), a bare word as a string (`high`, `gemini-2.5-flash-lite`), and `none` as
"unset" (the key's default, for keys whose default is none).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import SECTIONS, Config, ConfigError, check_setting, declarations, validate
from pipeline.config import with_overrides as apply_overrides
from pipeline.models import MEDIA_RESOLUTIONS, THINKING_LEVELS

VARY = "--vary"
REFERENCE = "--reference"
NONE = "none"
# The sections tune fills in itself: each run's inputs are the sample, its output a folder of
# the experiment's (varying them would compare answers about different images).
FIXED_SECTIONS = ("input", "output")
SAFE = re.compile(r"[^A-Za-z0-9._=+-]")  # what a folder name keeps as it is, on any OS
MAX_SLUG = 96


@dataclass(frozen=True, slots=True)
class Setting:
    """One point of the experiment: checked values by "section.key", in the order given."""

    values: tuple[tuple[str, Any], ...]

    @property
    def slug(self) -> str:
        """A folder name made of the keys and values (never of model text): path-safe, with a
        digest of the exact values when making it safe lost anything."""
        plain = "+".join(f"{key}={_shown(value)}" for key, value in self.values) or "as-configured"
        safe = SAFE.sub("_", plain)
        if safe == plain and len(plain) <= MAX_SLUG:
            return plain
        digest = hashlib.blake2b(plain.encode(), digest_size=4).hexdigest()
        return f"{safe[:MAX_SLUG]}-{digest}"

    @property
    def label(self) -> str:
        """As the table prints it: `images.max_side=96, api.model=gemini-2.5-flash-lite`."""
        return ", ".join(f"{key}={_shown(value)}" for key, value in self.values) or "as configured"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def applied(self, config: Config) -> Config:
        """`config` with these values, checked across keys as a loaded file is."""
        given = {key: value for key, value in self.values if value is not None}
        config = apply_overrides(config, given, VARY)
        unset = [key for key, value in self.values if value is None]
        return _unset(config, unset) if unset else config

    def snippet(self) -> str:
        """The values as TOML to paste into the config, by section; an unset key as a comment."""
        lines: list[str] = []
        for section, keys in itertools.groupby(
            sorted(self.values, key=lambda kv: kv[0].partition(".")[0]),
            key=lambda kv: kv[0].partition(".")[0],
        ):
            lines.append(f"[{section}]")
            lines += [_toml_line(key.partition(".")[2], value) for key, value in keys]
        return "\n".join(lines)


def _shown(value: Any) -> str:
    return NONE if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key}: leave it out (unset: the default)"
    if isinstance(value, tuple):
        value = list(value)
    return f"{key} = {json.dumps(value)}"


def _unset(config: Config, keys: Sequence[str]) -> Config:
    """Keys set back to none (only keys whose declared default is none get here): the loaded
    file's way of leaving a key out, then the checks across keys again."""
    for dotted in keys:
        section, _, key = dotted.partition(".")
        changed = dataclasses.replace(getattr(config, section), **{key: None})
        config = dataclasses.replace(config, **{section: changed})
    validate(config)
    return config


# ------------------------------------------------------------------------------- parsing
def parse_vary(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """`["images.max_side=48,96,none"]` -> {"images.max_side": (48, 96, None)}: each value
    checked by its key's declaration, duplicates (48 and 48, 0 and none) once."""
    given: dict[str, list[Any]] = {}
    for item in items:
        key, texts = _split(item, VARY)
        if key in given:
            raise ConfigError(f"{VARY} {key}: given twice; list its values once, comma-separated")
        given[key] = [_read(text) for text in texts.split(",")]
    return vary_of(given)


def vary_of(given: Mapping[str, Sequence[Any]]) -> dict[str, tuple[Any, ...]]:
    """Python values by key (`{"images.max_side": [48, 96, None]}`), checked as `parse_vary`'s."""
    varied: dict[str, tuple[Any, ...]] = {}
    for key, values in given.items():
        _check_key(key, VARY)
        checked = [check_value(key, value, VARY) for value in values]
        if not checked:
            raise ConfigError(f"{VARY} {key}: give at least one value")
        varied[key] = tuple(dict.fromkeys(checked))
    if not varied:
        raise ConfigError(f"{VARY}: give at least one KEY=V1,V2,... to compare")
    return varied


def parse_reference(items: Sequence[str]) -> dict[str, Any]:
    """`["images.max_side=none,api.model=gemini-2.5-pro"]` -> each key's one checked value."""
    given = {}
    for item in items:
        for pair in _pairs(item):
            key, text = _split(pair, REFERENCE)
            given[key] = _read(text)
    return reference_of(given)


def reference_of(given: Mapping[str, Any]) -> dict[str, Any]:
    """Python values by key, checked as `parse_reference`'s."""
    for key in given:
        _check_key(key, REFERENCE)
    return {key: check_value(key, value, REFERENCE) for key, value in given.items()}


def _pairs(item: str) -> list[str]:
    """`a.b=1,c.d=x` -> ["a.b=1", "c.d=x"]: a comma starts a new pair when a key= follows."""
    return [part for part in re.split(r",(?=[A-Za-z_]+\.[A-Za-z_]+=)", item) if part]


def _split(item: str, flag: str) -> tuple[str, str]:
    key, equals, values = item.partition("=")
    key = key.strip()
    if not equals or not values.strip():
        raise ConfigError(f"{flag} {item!r}: write KEY=VALUE (a key such as images.max_side)")
    return key, values


def _check_key(key: str, flag: str) -> None:
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(
            f"{flag} {key}: not a setting: use section.key, with a section of "
            f"{', '.join(SECTIONS)} (as in the config file)"
        )
    if section in FIXED_SECTIONS:
        raise ConfigError(
            f"{flag} {key}: tune sets [{section}] itself (the sample's images, the "
            "experiment's folders); vary what changes the answers"
        )
    if name not in declarations(section):
        known = ", ".join(sorted(declarations(section)))
        raise ConfigError(f"{flag} {key}: unknown key [{section}] {name} (known: {known})")


def _read(text: str) -> Any:
    """A value as typed: TOML (`48`, `"high"`, `true`), `none` as None, else the bare word."""
    text = text.strip()
    if text.lower() == NONE:
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def check_value(key: str, value: Any, flag: str) -> Any:
    """One value of a known `key`, checked by its declaration; None only where the default is."""
    section, _, name = key.partition(".")
    if value is None:
        if declarations(section)[name].default is not None:
            raise ConfigError(f"{flag} {key}: cannot be none (it has a default of its own)")
        return None
    return check_setting(section, name, value, flag, key)


# --------------------------------------------------------------------- the experiment's grid
def combinations(varied: Mapping[str, tuple[Any, ...]]) -> list[Setting]:
    """Every combination of the varied values, in the order given."""
    keys = list(varied)
    return [
        Setting(tuple(zip(keys, values, strict=True)))
        for values in itertools.product(*(varied[key] for key in keys))
    ]


def reference_setting(
    varied: Mapping[str, tuple[Any, ...]], chosen: Mapping[str, Any], config: Config
) -> Setting:
    """The reference: `--reference`'s values, and for every other varied key its richest value;
    keys only `--reference` names come last."""
    values = [
        (key, chosen[key] if key in chosen else richest(key, options, config))
        for key, options in varied.items()
    ]
    values += [(key, value) for key, value in chosen.items() if key not in varied]
    return Setting(tuple(values))


def richest(key: str, values: Sequence[Any], config: Config) -> Any:
    """The value of `key` that gives the model the most to work with (README, "Choosing a model
    and settings"); a key without such an order must be named in --reference."""
    rank = RICHNESS.get(key)
    if rank is None:
        raise ConfigError(
            f"{VARY} {key}: no richest value is defined for it; choose the reference with "
            f"{REFERENCE} {key}=VALUE"
        )
    return max(values, key=lambda value: rank(value, config))


def _side(value: Any, _: Config) -> tuple[int, int]:
    """None (images as they are) above every size, then the larger size."""
    return (value is None, value or 0)


def _ordered(levels: Sequence[str]) -> Callable[[Any, Config], int]:
    """A level's place in `levels` (lowest first); none (the model's own choice) below all."""
    return lambda value, _: -1 if value is None else levels.index(value)


def _budget(value: Any, _: Config) -> tuple[int, int]:
    """-1 (dynamic: as much as the model wants) above every fixed budget; none (the lowest
    the model allows) below."""
    return (value == -1, -1 if value is None else value)


def _model_price(value: Any, config: Config) -> float:
    """The most expensive model by the model table (per 1M tokens in + out, today)."""
    price = config.models.lookup(value).price() if config.models.is_known(value) else None
    return -1.0 if price is None else price.input + price.output


RICHNESS: dict[str, Callable[[Any, Config], Any]] = {
    "images.max_side": _side,
    "task.media_resolution": _ordered(MEDIA_RESOLUTIONS),
    "task.thinking_level": _ordered(THINKING_LEVELS),
    "task.thinking_budget": _budget,
    "api.model": _model_price,
}
