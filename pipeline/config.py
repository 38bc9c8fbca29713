"""TOML config -> typed, validated settings.

Every problem is reported as `ConfigError` naming the file and the key (`[limits] rpm`), because a
nightly job that dies on "invalid literal for int()" at 3 a.m. helps nobody. Relative paths in a
file resolve against the file's own directory, so a scheduled job works from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.tasks.base import TaskSettings

FLAVORS = ("generateContent", "interactions")
IMAGE_MODES = ("auto", "inline", "upload")
TASK_KINDS = ("detect", "segment", "caption", "classify", "custom")
MEDIA_RESOLUTIONS = ("low", "medium", "high", "ultra_high")
THINKING_LEVELS = ("minimal", "low", "medium", "high")


class ConfigError(ValueError):
    """A config problem, always naming where it is."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "https://generativelanguage.googleapis.com"  # or "local"
    model: str = "gemini-2.5-flash"
    flavor: str = "generateContent"
    version: str = "v1beta"
    timeout: float = 120.0  # deadline of one request, so a hung call cannot stall a run's end
    inline_limit_mb: float = 20.0  # the seeds' figure; the live service now takes 100 MB


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    concurrency: int = 16
    max_attempts: int = 6
    burst_seconds: float = 1.0  # capacity allowed at once: about a second, never a minute


@dataclass(frozen=True, slots=True)
class InputConfig:
    paths: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    manifest: str | None = None


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    mode: str = "auto"
    max_side: int | None = None
    delete_uploads: bool = True
    verify: bool = True


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: str = "out"
    rows_per_part: int = 5000
    flush_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """Options of the bundled local server when `[api] base_url = "local"`."""

    latency_ms: float = 0.0
    fault_rate: float = 0.0
    seed: int = 0
    rpm: int | None = None
    tpm: int | None = None
    replay: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    task: TaskSettings = field(default_factory=lambda: TaskSettings(kind="detect", model=""))
    output: OutputConfig = field(default_factory=OutputConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    source: str = "<defaults>"  # the file this came from, for messages

    @property
    def inline_limit_bytes(self) -> int:
        return int(self.api.inline_limit_mb * 1024 * 1024)


# Each key: (type check, converter). Types are checked strictly: TOML has real types, and a
# string "10" where a number belongs is a mistake worth naming.
def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def _pos_int(v: Any) -> int:
    if _int(v) <= 0:
        raise TypeError("a positive integer")
    return v


def _opt_pos_int(v: Any) -> int | None:
    """0 means "no limit" for quotas and sizes, which reads better in TOML than a missing key."""
    if _int(v) < 0:
        raise TypeError("an integer >= 0 (0 means none)")
    return v or None


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("a number")
    return float(v)


def _pos_number(v: Any) -> float:
    if _number(v) <= 0:
        raise TypeError("a positive number")
    return float(v)


def _fraction(v: Any) -> float:
    if not 0.0 <= _number(v) <= 1.0:
        raise TypeError("a number between 0 and 1")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("a non-empty string")
    return v


def _strs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise TypeError("a list of strings")
    return tuple(v)


def _one_of(*choices: str):
    def check(v: Any) -> str:
        if v not in choices:
            raise TypeError("one of " + ", ".join(repr(c) for c in choices))
        return v

    return check


def _schema(v: Any) -> dict[str, Any]:
    """A JSON schema as a TOML table or a JSON string."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise TypeError(f"a JSON schema (invalid JSON: {exc})") from None
    if not isinstance(v, dict):
        raise TypeError("a JSON schema object")
    return v


SECTIONS: dict[str, dict[str, Any]] = {
    "api": {
        "base_url": _str,
        "model": _str,
        "flavor": _one_of(*FLAVORS),
        "version": _str,
        "timeout": _pos_number,
        "inline_limit_mb": _pos_number,
    },
    "limits": {
        "rpm": _opt_pos_int,
        "tpm": _opt_pos_int,
        "rpd": _opt_pos_int,
        "concurrency": _pos_int,
        "max_attempts": _pos_int,
        "burst_seconds": _pos_number,
    },
    "input": {
        "paths": _strs,
        "include": _strs,
        "exclude": _strs,
        "follow_symlinks": _bool,
        "manifest": _str,
    },
    "images": {
        "mode": _one_of(*IMAGE_MODES),
        "max_side": _opt_pos_int,
        "delete_uploads": _bool,
        "verify": _bool,
    },
    "task": {
        "kind": _one_of(*TASK_KINDS),
        "prompt": _str,
        "system_instruction": _str,
        "labels": _strs,
        "max_objects": _pos_int,
        "temperature": _number,
        "max_output_tokens": _pos_int,
        "thinking_budget": _int,
        "thinking_level": _one_of(*THINKING_LEVELS),
        "media_resolution": _one_of(*MEDIA_RESOLUTIONS),
        "response_schema": _schema,
        "mask_threshold": _int,
    },
    "output": {"dir": _str, "rows_per_part": _pos_int, "flush_seconds": _pos_number},
    "local": {
        "latency_ms": _number,
        "fault_rate": _fraction,
        "seed": _int,
        "rpm": _opt_pos_int,
        "tpm": _opt_pos_int,
        "replay": _str,
    },
}


def _check_section(name: str, table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = SECTIONS[name]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key [{name}] {key} (known: {', '.join(sorted(known))})"
            )
        try:
            out[key] = known[key](value)
        except TypeError as exc:
            raise ConfigError(f"{source}: [{name}] {key} must be {exc}, got {value!r}") from None
    return out


def parse_config(data: dict[str, Any], source: str, base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; paths resolve against `base_dir` (the file's folder)."""
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sec = {name: _check_section(name, data.get(name, {}), source) for name in SECTIONS}

    def resolve(p: str) -> str:
        """Against the file's folder; `..` folded, symlinks kept (they may be the user's layout)."""
        path = Path(p).expanduser()
        return os.path.normpath(base_dir / path if base_dir and not path.is_absolute() else path)

    api = ApiConfig(**sec["api"])
    if api.base_url != "local" and not api.base_url.startswith(("http://", "https://")):
        raise ConfigError(f'{source}: [api] base_url must be an http(s) URL or "local"')
    inp = sec["input"]
    if "paths" in inp:
        inp["paths"] = tuple(resolve(p) for p in inp["paths"])
    if "manifest" in inp:
        inp["manifest"] = resolve(inp["manifest"])
    out = sec["output"]
    if "dir" in out:
        out["dir"] = resolve(out["dir"])
    local = sec["local"]
    if "replay" in local:
        local["replay"] = resolve(local["replay"])
    task_table = sec["task"]
    if "labels" in task_table:
        task_table["labels"] = tuple(task_table["labels"])
    mask_threshold = task_table.get("mask_threshold", 127)
    if not 0 <= mask_threshold <= 255:
        raise ConfigError(f"{source}: [task] mask_threshold must be between 0 and 255")
    task = TaskSettings(**{"kind": "detect", **task_table, "model": api.model})
    if task.kind == "classify" and not task.labels:
        raise ConfigError(f'{source}: [task] labels is required when [task] kind = "classify"')
    if task.kind == "custom" and not task.prompt:
        raise ConfigError(f'{source}: [task] prompt is required when [task] kind = "custom"')
    return Config(
        api=api,
        limits=LimitsConfig(**sec["limits"]),
        input=InputConfig(**inp),
        images=ImagesConfig(**sec["images"]),
        task=task,
        output=OutputConfig(**out),
        local=LocalConfig(**local),
        source=source,
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), path.parent.resolve())


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply command-line flags (None means "not given"), validated like the file's keys."""
    given = {k: v for k, v in overrides.items() if v is not None}
    source = "command line"
    api, limits, task, out = config.api, config.limits, config.task, config.output
    inp = config.input
    if "base_url" in given:
        api = replace(api, base_url=given["base_url"])
    if "model" in given:
        api = replace(api, model=given["model"])
        task = replace(task, model=given["model"])
    if "kind" in given:
        task = replace(task, kind=_check_flag("task", "kind", given["kind"], source))
    for key in ("rpm", "concurrency"):
        if key in given:
            limits = replace(limits, **{key: _check_flag("limits", key, given[key], source)})
    if "paths" in given:
        inp = replace(inp, paths=tuple(os.path.abspath(p) for p in given["paths"]))
    if "output" in given:
        out = replace(out, dir=os.path.abspath(given["output"]))
    if task.kind == "classify" and not task.labels:
        raise ConfigError(f'{config.source}: [task] labels is required for kind "classify"')
    return replace(config, api=api, limits=limits, task=task, input=inp, output=out)


def _check_flag(section: str, key: str, value: Any, source: str) -> Any:
    try:
        return SECTIONS[section][key](value)
    except TypeError as exc:
        raise ConfigError(f"{source}: --{key} must be {exc}, got {value!r}") from None


def settings_hash(config: Config, request: GenerateRequest) -> str:
    """Hash of everything that changes the answer: model, flavor, prompt and generation settings
    (the whole request the task builds), and what is done to the image before sending.

    Parse-only settings (mask threshold) are left out on purpose: changing them is a `reparse`,
    not a new API call.
    """
    payload = {
        "flavor": config.api.flavor,
        "request": asdict(request),
        "max_side": config.images.max_side,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
