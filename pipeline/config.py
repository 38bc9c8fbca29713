"""TOML config -> typed, validated settings.

Every setting is declared once, as a field of its section's dataclass (`settings.setting`: its
default, its check, its documentation, its command-line flag), and every path in — the TOML file,
the flags, `reparse` — validates through that declaration. Every problem is a `ConfigError`
naming the file and the key (`[limits] rpm`), because a nightly job that dies on "invalid literal
for int()" at 3 a.m. helps nobody. Relative paths in a file resolve against the file's own
directory, so a scheduled job works from any working directory; paths given as flags resolve
against the working directory.

Settings that depend on the model (thinking, media resolution, masks, the Interactions API) are
checked against the model table (`pipeline/models.py`, plus the config's `[models."id"]` tables)
when the config is loaded, so a setting the service would refuse on every request stops the run
before its first call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pipeline import settings as s
from pipeline.gemini.backends import BACKENDS, REQUEST_TYPES
from pipeline.gemini.tokens import DEFAULT_MEDIA_RESOLUTION
from pipeline.gemini.types import DEFAULT_BASE_URL, Flavor, GenerateRequest
from pipeline.localserver.options import LocalOptions
from pipeline.locations import (
    STORE_CONNECT_SECONDS,
    STORE_READ_SECONDS,
    is_url,
    local_path,
    normalise_url,
    scheme_of,
)
from pipeline.models import Model, ModelTable, ModelTableError, default_table
from pipeline.rowtypes import KeySuffixes
from pipeline.settings import setting
from pipeline.tasks import get_task
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.generation import SettingError

log = logging.getLogger(__name__)

FLAVORS: tuple[Flavor, ...] = ("generateContent", "interactions")
MODES = ("interactive", "batch")
CONTEXT_CACHE = ("auto", "on", "off")  # [api] context_cache (pipeline/run/context_cache.py)
BATCH_RETRIES = ("batch", "interactive")
API_VERSIONS = ("v1beta", "v1", "v1alpha")
IMAGE_MODES = ("auto", "inline", "upload")
GROUP_RULES = ("none", "folder", "manifest")


# Inline request limits, MB (MiB, as the service counts: "exceeds the limit: 20971520 bytes"):
# the live service's interactive one since 2026-01 is the most a run may set, Batch Mode's is
# what a batch run holds each request to (docs/gemini-api.md § Sending images).
MAX_INLINE_LIMIT_MB = 100
BATCH_INLINE_LIMIT_MB = 20


class ConfigError(ValueError):
    """A config problem, always naming where it is."""


def _base_url(v: Any) -> str:
    if s.text(v) != "local" and not v.startswith(("http://", "https://")):
        raise TypeError('an http(s) URL or "local"')
    return v


# What a Google Cloud project id (or a domain-scoped "example.com:id") and a location may hold:
# both go into the request's path, so nothing else may ("/", "?", "..").
_PROJECT = re.compile(r"[a-z][a-z0-9.:-]{3,62}[a-z0-9]")
_LOCATION = re.compile(r"[a-z][a-z0-9-]{1,40}[a-z0-9]")


def _project(v: Any) -> str:
    if not _PROJECT.fullmatch(s.text(v)) or ".." in v:
        raise TypeError('a Google Cloud project id such as "my-project"')
    return v


def _location(v: Any) -> str:
    if not _LOCATION.fullmatch(s.text(v)):
        raise TypeError('a Vertex AI location such as "us-central1" or "global"')
    return v


def _gs_prefix(v: Any) -> str:
    """A Cloud Storage prefix: Vertex batch prediction reads its input and writes its output
    only there (the REST reference: gcsSource, gcsDestination)."""
    if not s.text(v).startswith("gs://") or len(v.rstrip("/")) <= len("gs://") or ".." in v:
        raise TypeError('a Cloud Storage prefix such as "gs://my-bucket/gvp-batch"')
    return v.rstrip("/")


def _inline_limit_mb(v: Any) -> float:
    """Above 100 MB the service refuses every request that uses the room: refused here."""
    if s.positive_number(v) > MAX_INLINE_LIMIT_MB:
        raise TypeError(
            f"a number of MB above 0 and at most {MAX_INLINE_LIMIT_MB} (the live service's "
            "interactive limit)"
        )
    return float(v)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = setting(
        DEFAULT_BASE_URL,
        _base_url,
        'the endpoint; "local" starts the bundled server in-process',
        flag="--base-url",
    )
    model: str = setting(
        "gemini-2.5-flash",
        s.text,
        "picks thinking, schema, token rules and prices (`pipeline models`)",
        flag="--model",
    )
    flavor: Flavor = setting(  # checked: one of FLAVORS
        "generateContent", s.one_of(*FLAVORS), "or interactions (sent with store: false)"
    )
    version: str = setting(
        "v1beta", s.one_of(*API_VERSIONS), "per-image resolution: one the model table lists"
    )
    timeout: float = setting(
        120.0, s.positive_number, "seconds; the longest deadline of a request (see min_timeout)"
    )
    min_timeout: float = setting(
        1.0, s.positive_number, "the shortest: deadlines follow 4x the p99 latency in between"
    )
    max_retry_delay: float = setting(
        300.0, s.positive_number, "seconds; the longest wait a retryDelay can ask for"
    )
    inline_limit_mb: float = setting(
        20.0,
        _inline_limit_mb,
        "inline request limit: 20 works everywhere, up to 100 interactively (Batch Mode: 20)",
    )
    max_response_mb: float = setting(
        32.0, s.positive_number, "an answer bigger than this is refused unread (an error row)"
    )
    allow_insecure_http: bool = setting(
        False, s.flag, "send the key over plain http:// to a host other than this machine"
    )
    mode: str = setting(
        "interactive",
        s.one_of(*MODES),
        "batch: Batch Mode jobs, half the price, within 24 h (see [batch]; or --batch)",
        flag="--mode",
    )
    context_cache: str = setting(
        "auto",
        s.one_of(*CONTEXT_CACHE),
        "reference images and system instruction cached (cachedContents): auto when it pays",
    )
    context_cache_ttl: float = setting(
        600.0, s.positive_number, "seconds a cache lives unrenewed (renewed at half of it)"
    )
    backend: str = setting(
        "developer",
        s.one_of(*BACKENDS),
        'or "vertex": Gemini on Vertex AI, with project and location (README: Using Vertex AI)',
        flag="--backend",
    )
    project: str | None = setting(
        None, s.optional(_project), "vertex: the project (default GOOGLE_CLOUD_PROJECT, ADC's)"
    )
    location: str | None = setting(
        None,
        s.optional(_location),
        'vertex: "us-central1", ... or "global" (default GOOGLE_CLOUD_LOCATION, else global)',
    )
    vertex_request_type: str = setting(
        "",
        s.one_of(*REQUEST_TYPES),
        'vertex: "dedicated" (Provisioned Throughput only: a 429 past it) or "shared" '
        "(pay-as-you-go only); empty: Provisioned Throughput first, the overage on demand",
    )
    batch_staging: str | None = setting(
        None,
        s.optional(_gs_prefix),
        'vertex batch: "gs://bucket/prefix" where job inputs are written and outputs read',
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    rpm: int | None = setting(
        None, s.count_or_none, "requests per minute (0: none)", flag="--rpm", type=int
    )
    tpm: int | None = setting(None, s.count_or_none, "input tokens per minute (0: none)")
    rpd: int | None = setting(None, s.count_or_none, "requests per day (0: none)")
    max_usd: float | None = setting(
        None,
        s.usd_or_none,
        "USD this run may spend, in-flight requests at their estimate (0: none)",
        flag="--max-usd",
        type=float,
    )
    max_usd_per_day: float | None = setting(
        None, s.usd_or_none, "USD per quota day (midnight Pacific) in this output (0: none)"
    )
    # 10%: a new prompt or model (every row) is asked about, a max_side that shrinks a few
    # huge images is not (pipeline/run/plan.py `redo_guard`)
    max_redo: float = setting(
        0.1,
        s.between(0, 1),
        "share of this task's committed rows a run may redo because settings changed before "
        "it asks for --yes (1: never asks)",
    )
    concurrency: int = setting(
        16, s.positive_int, "requests in flight", flag="--concurrency", type=int
    )
    max_attempts: int = setting(
        6, s.positive_int, "per image, for retryable errors (408, 429, 5xx, timeouts, resets)"
    )
    burst_seconds: float = setting(
        1.0, s.positive_number, "capacity allowed at once: about a second, never a minute"
    )


# The default `[input] include`: the file kinds pipeline/inputs/images.py can send (PNG, JPEG,
# WEBP, HEIC/HEIF as they are; GIF, BMP, TIFF, ICO, PPM/PGM/PBM, AVIF converted to PNG). A
# folder's README or .txt is then passed over and counted "ignored" instead of becoming an error
# row every night; `include = ["*"]` takes every file (the format is sniffed from the bytes).
IMAGE_PATTERNS = tuple(
    f"*.{ext}"
    for ext in (
        *("png", "jpg", "jpeg", "jpe", "jfif", "webp", "heic", "heif"),
        *("gif", "bmp", "dib", "tif", "tiff", "ico", "ppm", "pgm", "pbm", "pnm", "avif"),
    )
)


@dataclass(frozen=True, slots=True)
class InputConfig:
    paths: tuple[str, ...] = setting(
        (),
        s.texts,
        "folders (walked lazily, in a deterministic order) or files",
        flag="--input",
        many=True,
        path=True,
    )
    include: tuple[str, ...] = setting(
        IMAGE_PATTERNS, s.texts, "glob patterns on the relative path (default: image kinds)"
    )
    exclude: tuple[str, ...] = setting((), s.texts, "glob patterns on the relative path")
    follow_symlinks: bool = setting(False, s.flag, "follow symlinked folders (loops: error rows)")
    manifest: str | None = setting(
        None, s.text, "a .txt, .csv or .parquet list of files (column path)", path=True
    )
    group_by: str = setting(
        "none",
        s.one_of(*GROUP_RULES),
        "one request per group: folder (each folder's files) or manifest (its group column)",
    )
    fetch_concurrency: int = setting(
        32, s.positive_int, "objects and URLs read at once (a run reads what its workers need)"
    )
    fetch_per_host: int = setting(4, s.positive_int, "connections to one URL host at once")
    max_fetch_mb: float = setting(
        64.0, s.positive_number, "an object or URL larger than this is an error row, unread"
    )
    allow_hosts: tuple[str, ...] = setting(
        (),
        s.texts,
        "URL hosts (names or addresses) fetched even on loopback, private or link-local addresses",
    )


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    mode: str = setting(
        "auto", s.one_of(*IMAGE_MODES), "auto inlines what fits the limit, else uploads"
    )
    max_side: int | None = setting(
        None, s.count_or_none, "downscale before sending; coordinates still map to the original"
    )
    delete_uploads: bool = setting(True, s.flag, "delete this output's uploads at the end")
    verify: bool = setting(True, s.flag, "check each image before paying for it")
    decode_budget_mb: int | None = setting(
        None,
        s.count_or_none,
        "decoded pixels in flight at once, in MB (none: a quarter of the memory, <= 512 MB a core)",
    )


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: str = setting("out", s.text, "the dataset folder", flag="--output", path=True)
    rows_per_part: int = setting(5000, s.positive_int, "rows in one Parquet part at most ...")
    part_mb: int = setting(
        256, s.positive_int, "... or this many MB of answers (big answers: memory, part size)"
    )
    flush_seconds: float = setting(30.0, s.positive_number, "a part is written this often")
    journal_seconds: float = setting(
        1.0, s.positive_number, "an answer is fsynced (safe from a machine crash) within this ..."
    )
    journal_rows: int = setting(256, s.positive_int, "... or after this many more answers")
    lease_seconds: float = setting(
        60.0, s.positive_number, "object-store outputs: a killed run's lease frees it after this"
    )


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Object stores (s3://, gs://): inputs, outputs and the Vertex batch staging prefix (the
    defaults' reasons: pipeline/locations.py)."""

    connect_seconds: float = setting(
        STORE_CONNECT_SECONDS,
        s.positive_number,
        "a store request's connection is given up after this long",
    )
    read_seconds: float = setting(
        STORE_READ_SECONDS,
        s.positive_number,
        "... and its answer once nothing of it came for this long (an idle bound: a slow big "
        "transfer that keeps coming is never cut); then it is retried as a store's failure is",
    )


# [local]: the options of the bundled local server when `[api] base_url = "local"`, declared once
# beside the server (pipeline/localserver/options.py), whose `serve-local` flags are made from them.
LocalConfig = LocalOptions


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How `[api] mode = "batch"` cuts the work into jobs, follows them and retries."""

    requests_per_job: int = setting(10_000, s.positive_int, "requests in one job at most")
    max_job_mb: float = setting(
        1900.0, s.positive_number, "one job's JSONL input file at most (the service takes 2 GB)"
    )
    max_job_tokens: int | None = setting(
        None, s.count_or_none, "estimated input tokens of one job (the model's enqueued cap)"
    )
    max_jobs: int = setting(100, s.positive_int, "jobs in flight at once (the service: 100)")
    poll_seconds: float = setting(10.0, s.positive_number, "first wait between two polls")
    max_poll_seconds: float = setting(
        60.0, s.positive_number, "longest wait between polls (the wait grows 1.5x while idle)"
    )
    retry: str = setting(
        "batch",
        s.one_of(*BATCH_RETRIES),
        "how a later run retries a retryable per-request error: in a batch, or interactively",
    )
    output_wait_seconds: float = setting(
        1800.0,
        s.positive_number,
        "how long a run waits for the output of a job that says it succeeded without it (seen "
        "live): then the run ends (exit 3), the job left in flight for a later run (30 min)",
    )
    ended_output_grace_seconds: float = setting(
        1800.0,
        s.non_negative_number,
        "Vertex: how long after a job ended FAILED, PARTIALLY_SUCCEEDED or CANCELLED (its endTime) "
        "the prediction lines it answered are waited for; then what is there is collected (30 min)",
    )


ENGINES = ("single", "ray")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the work is spread (pipeline/engines/): one process, or a Ray cluster."""

    kind: str = setting(
        "single", s.one_of(*ENGINES), "single (this process) or ray (a cluster)", flag="--engine"
    )
    address: str | None = setting(
        None,
        s.text,
        "ray: the cluster (ray://host:10001, host:6379, auto); none: start Ray here",
        flag="--address",
    )
    workers: int | None = setting(
        None, s.count_or_none, "ray: worker actors (0: one per CPU)", flag="--workers", type=int
    )
    worker_cpus: float = setting(
        1.0, s.non_negative_number, "ray: CPUs each worker reserves (it prepares images)"
    )


@dataclass(frozen=True, slots=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    task: TaskSettings = field(default_factory=TaskSettings)
    output: OutputConfig = field(default_factory=OutputConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    models: ModelTable = field(default_factory=default_table, repr=False)
    source: str = "<defaults>"  # the file this came from, for messages

    @property
    def inline_limit_bytes(self) -> int:
        return int(self.api.inline_limit_mb * 1024 * 1024)

    @property
    def batch_inline_limit_bytes(self) -> int:
        """What a Batch Mode request may carry inline: the setting, at most Batch Mode's 20 MB."""
        return min(self.inline_limit_bytes, BATCH_INLINE_LIMIT_MB * 1024 * 1024)


SECTIONS: dict[str, type] = {
    "api": ApiConfig,
    "limits": LimitsConfig,
    "input": InputConfig,
    "images": ImagesConfig,
    "task": TaskSettings,
    "output": OutputConfig,
    "local": LocalConfig,
    "batch": BatchConfig,
    "engine": EngineConfig,
    "storage": StorageConfig,
}
MODELS_SECTION = "models"  # [models."id"]: entries added to the model table


def declarations(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in s.declared(SECTIONS[section])}


def flags() -> list[tuple[str, str, dataclasses.Field]]:
    """(section, key, field) of every setting that has a command-line flag."""
    return [
        (name, f.name, f)
        for name, section in SECTIONS.items()
        for f in s.declared(section)
        if f.metadata["flag"]
    ]


# Keys a release retired: still accepted (a nightly job's config keeps loading), with a warning
# saying why they no longer do anything.
RETIRED = {
    ("output", "compact_above"): "superseded rows are set aside at the end of every run now "
    "(only the parts holding them are rewritten), so there is no share to compact above",
}


def check_setting(section: str, key: str, value: Any, source: str, shown: str = "") -> Any:
    """`value` for `[section] key` checked by its declaration; ConfigError naming it otherwise."""
    known = declarations(section)
    if key not in known:
        raise ConfigError(
            f"{source}: unknown key [{section}] {key} (known: {', '.join(sorted(known))})"
        )
    try:
        return s.check_value(known[key], value)
    except TypeError as exc:
        name = shown or f"[{section}] {key}"
        raise ConfigError(f"{source}: {name} must be {exc}, got {value!r}") from None


def _resolve(path: str, base_dir: Path | None) -> str:
    """Against the file's folder (or the working directory); `..` folded, symlinks kept.
    URLs (s3://, gs://, https://, ...) stay as they are (`file://` becomes its path)."""
    if is_url(path) and scheme_of(path) != "file":
        return normalise_url(path) if scheme_of(path) not in ("http", "https") else path
    p = Path(local_path(path)).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    return os.path.normpath(p)


def _section(name: str, table: Any, source: str, base_dir: Path | None) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    values = {
        key: check_setting(name, key, value, source)
        for key, value in table.items()
        if not _retired(name, key, source)
    }
    return _with_paths(name, values, base_dir)


def _retired(section: str, key: str, source: str) -> bool:
    why = RETIRED.get((section, key))
    if why is not None:
        log.warning(
            "%s: [%s] %s no longer does anything (%s): remove it", source, section, key, why
        )
    return why is not None


def _with_paths(name: str, values: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    known = declarations(name)
    for key, value in values.items():
        if known[key].metadata.get("path") and value is not None:
            many = isinstance(value, tuple)
            resolved = [_resolved(p, base_dir) for p in (value if many else (value,))]
            values[key] = tuple(resolved) if many else resolved[0]
    return values


def _resolved(value: Any, base_dir: Path | None) -> Any:
    """A path resolved, or a value holding one (a reference image) with its path resolved."""
    if isinstance(value, str):
        return _resolve(value, base_dir)
    return value.resolved(lambda path: _resolve(path, base_dir))


def _models(tables: Any, source: str) -> ModelTable:
    if not isinstance(tables, dict):
        raise ConfigError(f'{source}: [models] must hold tables such as [models."gemini-x"]')
    for name, table in tables.items():
        try:
            default_table().with_entries({name: table})
        except ModelTableError as exc:
            raise ConfigError(f"{source}: [models.{json.dumps(name)}] {exc}") from None
    return default_table().with_entries(tables)


def parse_config(data: dict[str, Any], source: str, base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; paths resolve against `base_dir` (the file's folder)."""
    for name in data:
        if name not in SECTIONS and name != MODELS_SECTION:
            known = ", ".join([*SECTIONS, MODELS_SECTION])
            raise ConfigError(f"{source}: unknown section [{name}] (known: {known})")
    given = {name: _section(name, data.get(name, {}), source, base_dir) for name in SECTIONS}
    models = _models(data.get(MODELS_SECTION, {}), source)
    return _build(given, models, source)


def _build(given: dict[str, dict[str, Any]], models: ModelTable, source: str) -> Config:
    api = ApiConfig(**given["api"])
    inputs = InputConfig(**given["input"])
    task = TaskSettings(
        **given["task"],
        model=api.model,
        flavor=api.flavor,
        version=api.version,
        grouped=inputs.group_by != "none",
        models=models,
    )
    config = Config(
        api=api,
        limits=LimitsConfig(**given["limits"]),
        input=inputs,
        images=ImagesConfig(**given["images"]),
        task=task,
        output=OutputConfig(**given["output"]),
        local=LocalConfig(**given["local"]),
        batch=BatchConfig(**given["batch"]),
        engine=EngineConfig(**given["engine"]),
        storage=StorageConfig(**given["storage"]),
        models=models,
        source=source,
    )
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks across keys and against the model table; ConfigError naming the key."""
    task, source, spec = config.task, config.source, config.task.spec
    if task.kind == "classify" and not task.labels:
        raise ConfigError(f'{source}: [task] labels is required when [task] kind = "classify"')
    if task.kind == "custom" and not task.prompt:
        raise ConfigError(f'{source}: [task] prompt is required when [task] kind = "custom"')
    _validate_groups(config)
    if config.api.flavor == "interactions" and not spec.interactions:
        raise ConfigError(
            f'{source}: [api] flavor = "interactions": {spec.name} is not served by the '
            'Interactions API; use "generateContent"'
        )
    _warn_thinking_through_interactions(config)
    _validate_context_cache(config)
    _validate_vertex(config)
    _validate_batch(config)
    _validate_engine(config)
    try:
        get_task(task.kind).request(task)
    except SettingError as exc:
        raise ConfigError(f"{source}: [task] {exc.key}: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: [task]: {exc}") from None


def _warn_thinking_through_interactions(config: Config) -> None:
    """Interactions sets thinking by level only, so a budget model (2.5) cannot be told "off"
    there: it thinks dynamically and bills thought tokens generateContent would not (the
    model table's `interactions` sources). generateContent stays the default; an explicit
    choice is kept, with this warning."""
    spec = config.task.spec
    if config.api.flavor == "interactions" and spec.thinking.control == "budget":
        log.warning(
            '%s: [api] flavor = "interactions": %s cannot turn thinking off there (no '
            "thinking budget on that API): it thinks and bills thought tokens; "
            '"generateContent" sends thinking_budget = %s',
            config.source,
            spec.name,
            spec.thinking.lowest()[0],
        )


def require_available(config: Config, on: date | None = None) -> None:
    """A run on a model the service has shut down fails at its first call: refuse it here,
    naming the day and the replacement the deprecations page gives (the model table's
    `status`). Only runs: status, reparse and export of its stored rows need no call."""
    status = config.task.spec.status
    if status.is_shut_down(on):
        assert status.shut_down is not None
        instead = f"; use {status.replacement}" if status.replacement else ""
        raise ConfigError(
            f'{config.source}: [api] model = "{config.api.model}": {config.task.spec.name} was '
            f"shut down on {status.shut_down.isoformat()}{instead} (`pipeline models` lists "
            "what is available)"
        )


def _validate_context_cache(config: Config) -> None:
    """A cached content is named by generateContent requests only (the caching page: "The
    Interactions API only supports implicit caching"), for a model that caches."""
    if config.api.context_cache != "on":
        return
    if config.api.flavor != "generateContent":
        raise ConfigError(
            f'{config.source}: [api] context_cache = "on": the Interactions API takes no cached '
            'content; set [api] flavor = "generateContent" (or context_cache = "auto")'
        )
    if config.api.backend == "vertex":
        raise ConfigError(
            f'{config.source}: [api] context_cache = "on": context caches are made on the '
            'Developer API only (not on Vertex AI yet); set context_cache = "auto" or "off"'
        )
    if config.task.spec.cache_min_tokens is None:
        raise ConfigError(
            f'{config.source}: [api] context_cache = "on": {config.task.spec.name} has no '
            "context caching (the model table's cache_min_tokens)"
        )


def _validate_groups(config: Config) -> None:
    """A folder rule groups walked folders; a manifest's groups are its `group` column."""
    rule, inputs, source = config.input.group_by, config.input, config.source
    if rule == "folder" and inputs.manifest:
        raise ConfigError(
            f'{source}: [input] group_by = "folder" groups the folders of [input] paths; '
            'a manifest\'s groups are its group column: use group_by = "manifest"'
        )
    if rule == "manifest" and (inputs.paths or not inputs.manifest):
        raise ConfigError(
            f'{source}: [input] group_by = "manifest" groups the rows of [input] manifest by '
            "its group column: set manifest, and no paths"
        )


def _validate_vertex(config: Config) -> None:
    """What Gemini on Vertex AI does not serve: Interactions and the Files API (so no uploads; a
    gs:// input is read in place); batch prediction needs a gs:// staging prefix."""
    api, source = config.api, config.source
    if api.backend != "vertex":
        if api.vertex_request_type:
            raise ConfigError(
                f"{source}: [api] vertex_request_type: Provisioned Throughput is Vertex AI's; "
                'set [api] backend = "vertex", or remove vertex_request_type'
            )
        return
    if api.flavor == "interactions":
        raise ConfigError(
            f'{source}: [api] flavor = "interactions": the Interactions API is not on Vertex AI '
            '([api] backend = "vertex"); use flavor = "generateContent"'
        )
    if config.images.mode == "upload":
        raise ConfigError(
            f'{source}: [images] mode = "upload": Vertex AI has no Files API; use "auto" '
            '(inline, and gs:// objects read in place) or "inline"'
        )
    if api.mode == "batch" and api.batch_staging is None:
        raise ConfigError(
            f'{source}: [api] batch_staging: required with [api] mode = "batch" on Vertex AI '
            "(batch prediction reads its input and writes its output in Cloud Storage): set "
            'batch_staging = "gs://my-bucket/gvp-batch"'
        )


def _validate_batch(config: Config) -> None:
    """Batch Mode serves generateContent only, and only the models whose table entry says so."""
    if config.api.mode != "batch":
        return
    source, spec = config.source, config.task.spec
    if config.api.flavor != "generateContent":
        raise ConfigError(
            f'{source}: [api] mode = "batch": Batch Mode runs generateContent requests only; '
            'set [api] flavor = "generateContent"'
        )
    if not spec.batch:
        raise ConfigError(
            f'{source}: [api] mode = "batch": {spec.name} is not served by Batch Mode'
        )
    if config.batch.max_poll_seconds < config.batch.poll_seconds:
        raise ConfigError(f"{source}: [batch] max_poll_seconds must be >= poll_seconds")
    if config.input.group_by != "none":
        raise ConfigError(
            f"{source}: [input] group_by: Batch Mode sends one file a request; run groups "
            'with [api] mode = "interactive"'
        )


def _validate_engine(config: Config) -> None:
    """The Ray engine spreads requests over workers: not Batch Mode's jobs."""
    if config.engine.kind != "ray":
        return
    if config.api.mode == "batch":
        raise ConfigError(
            f'{config.source}: [engine] kind = "ray": Batch Mode runs on the service\'s fleet; '
            'use [engine] kind = "single" with [api] mode = "batch"'
        )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), path.parent.resolve())


COMMAND_LINE = "command line"


def with_overrides(
    config: Config, overrides: Mapping[str, Any], source: str = COMMAND_LINE
) -> Config:
    """Apply values keyed "section.key" (None: not given), each checked by its declaration;
    paths resolve against the working directory. From the command line a bad value is named by
    its flag, from elsewhere (`pipeline.run(..., overrides=...)`) by its key."""
    given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = _split_key(dotted, source)
        flag = declarations(section).get(key)
        shown = flag.metadata["flag"] if flag and source == COMMAND_LINE else ""
        given[section][key] = check_setting(section, key, value, source, shown)
    if not any(given.values()):
        return config
    merged = {
        name: {**_current(config, name), **_with_paths(name, values, None)}
        for name, values in given.items()
    }
    return _build(merged, config.models, config.source)


def _split_key(dotted: str, source: str) -> tuple[str, str]:
    """ "section.key" -> (section, key); a ConfigError naming it when there is no such section
    (a typo in code reaches here, where the command line's flags cannot)."""
    section, dot, key = dotted.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(
            f"{source}: {dotted!r} is not a setting: use section.key, with a section of "
            f"{', '.join(SECTIONS)}"
        )
    return section, key


def _current(config: Config, section: str) -> dict[str, Any]:
    values = getattr(config, section)
    return {key: getattr(values, key) for key in declarations(section)}


EFFECTIVE_RULE = "effective-1"  # names the key rule below: a later rule never collides


def key_suffixes(
    config: Config, request: GenerateRequest, references: list[dict[str, Any]] | None = None
) -> KeySuffixes:
    """The run's key suffixes (`records.KeySuffixes`), hashed from the *effective* request:
    what is sent, not what is configured. So a media resolution equal to the one the model
    uses anyway is left out, and `max_side` enters only the `resized` suffix (the images it
    shrinks). The older rule's hashes (`settings_hash`) of this config, and of it without
    `max_side`, are accepted as aliases: rows keyed by them are the same requests.

    `[api] backend` is left out on purpose: Vertex AI and the Developer API serve the same
    model to the same request (two doors to one model; the wire body is the same), so a row
    bought through one is the answer the other would give — a run moved to Vertex resumes
    where it stopped, and every key made before backends existed stays as it was. (The flavor
    is in: Interactions thinks differently for the same model.)"""
    base: dict[str, Any] = {
        "rule": EFFECTIVE_RULE,
        "flavor": config.api.flavor,
        "request": asked(effective_request(request, config.task.spec)),
    }
    if references:
        base["references"] = references
    max_side = config.images.max_side
    resized = None if max_side is None else _digest({**base, "max_side": max_side})
    legacy = settings_hash(config, request, references)
    if max_side is None:  # the legacy hash of this config is that of an image sent as is
        return KeySuffixes(_digest(base), as_is_aliases=(legacy,))
    unlimited = dataclasses.replace(
        config, images=dataclasses.replace(config.images, max_side=None)
    )
    as_is_alias = settings_hash(unlimited, request, references)
    return KeySuffixes(_digest(base), resized, max_side, (legacy,), (as_is_alias,))


# How a request travels, never what it asks: a cached content holding its system instruction and
# reference images (pipeline/run/context_cache.py). Left out of the hashes, so an image's key is
# the same cached or not, and keys hashed before the field existed still match.
TRANSPORT_FIELDS = ("cached_content",)


def asked(request: GenerateRequest) -> dict[str, Any]:
    """The request's fields that make the question (what the key hashes)."""
    fields = asdict(request)
    for name in TRANSPORT_FIELDS:
        del fields[name]
    return fields


def effective_request(request: GenerateRequest, model: Model) -> GenerateRequest:
    """`request` without the settings that cannot change the answer: a media resolution equal
    to the level a budget model (Gemini 3) applies when none is sent (the model table's token
    rule; 2.x models bill differently with any level, so theirs always counts)."""
    level = request.media_resolution
    if model.tokens == "budget" and level == DEFAULT_MEDIA_RESOLUTION:
        return dataclasses.replace(request, media_resolution=None)
    return request


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def settings_hash(
    config: Config, request: GenerateRequest, references: list[dict[str, Any]] | None = None
) -> str:
    """The legacy key suffix (before `key_suffixes`), kept so rows keyed by it are still found:
    hash of everything that changes the answer: model, flavor, prompt and generation settings
    (the whole request the task builds), what is done to the image before sending, and the
    reference images sent with it (their bytes' sha256 and captions, in order:
    pipeline/inputs/references.py), which only a config with references has.

    Parse-only settings (mask threshold) are left out on purpose: changing them is a `reparse`,
    not a new API call.
    """
    payload: dict[str, Any] = {
        "flavor": config.api.flavor,
        "request": asked(request),
        "max_side": config.images.max_side,
    }
    if references:
        payload["references"] = references
    return _digest(payload)
