"""The local server's options, each declared once (`pipeline.settings.setting`: its default, its
check, its documentation and the type its command-line value is parsed by).

`LocalOptions` are those a run's config may set: they are its `[local]` section, the server a
run starts in-process with `[api] base_url = "local"` (pipeline/config.py uses this class as it
is). `ServerOptions` adds what only a server of its own has: where it listens, the key it takes,
the faults it may inject, its request-size limits (the interactive one, which a run sets to its
`[api] inline_limit_mb`, and Batch Mode's), how long uploads stay PROCESSING, an answer log.
`pipeline serve-local` makes one flag per option from these declarations (serve.py), and every
instance checks each value by its declaration when it is created: a bound is written once for
the flags, the config and Python callers alike.

A check raises TypeError completing "must be ..." (pipeline/settings.py's convention), worded as
the server's own messages always were ("fault_rate must be within [0, 1], got 2.0").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import settings as s
from pipeline.localserver.faults import FAULT_KINDS
from pipeline.models import default_table
from pipeline.settings import Check, check_value, declared, setting

# The values of --simulate / [local] simulate (pipeline/localserver/simulation.py): here, so a
# config that names one does not import the simulation's numpy and Pillow.
SIMULATIONS = ("none", "settings")

_MIB = 1 << 20


def _bounded(kind: Check, within: Callable[[Any], bool], what: str) -> Check:
    """`kind` (a type check of pipeline.settings) held to a bound; TypeError(`what`) outside."""

    def check(v: Any) -> Any:
        value = kind(v)
        if not within(value):
            raise TypeError(what)
        return value

    return check


_AT_LEAST_ZERO = _bounded(s.number, lambda x: x >= 0, ">= 0")
_POSITIVE = _bounded(s.number, lambda x: x > 0, "positive")
_POSITIVE_COUNT = _bounded(s.integer, lambda n: n > 0, "positive")
_SHARE = _bounded(s.number, lambda x: 0 <= x <= 1, "within [0, 1]")
_PORT = _bounded(s.integer, lambda n: 0 <= n <= 65535, "within 0-65535")
_BUDGET = s.optional(_bounded(s.number, lambda x: x >= 0, ">= 0 or None"))


def _limit(v: Any) -> int | None:
    """A positive count, or None for no limit; 0 means none too, as everywhere in a config
    (TOML has no None), and so on the command line."""
    if v is None:
        return None
    if s.integer(v) < 0:
        raise TypeError("a positive integer or None")
    return v or None


def _string(v: Any) -> str:
    """Any string: an empty host binds every interface, an empty log path writes none."""
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _api_key(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v):
        return v
    raise TypeError("None (accept any key) or a non-empty string")


def _mebibytes(text: str) -> int:
    """A flag's MiB as bytes (the option is in bytes, as a run passes it)."""
    return int(float(text) * _MIB)


def _kinds(text: str) -> tuple[str, ...]:
    """A flag's comma-separated list."""
    return tuple(kind.strip() for kind in text.split(",") if kind.strip())


AliasTargets = tuple[tuple[str, str], ...]


def _alias_targets(v: Any) -> AliasTargets:
    """(alias, target) pairs from a table (TOML), or "alias=target" strings (the flag's, or
    a list of them); each alias one of the model table's."""
    items = v.items() if isinstance(v, Mapping) else v
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise TypeError("a table alias = target, or alias=target strings")
    pairs = tuple(_alias_pair(item) for item in items)
    aliases = sorted(default_table().aliases)
    if any(alias not in aliases for alias, _ in pairs):
        raise TypeError(f"a table whose aliases are the model table's ({', '.join(aliases)})")
    return pairs


def _alias_pair(item: Any) -> tuple[str, str]:
    alias, target = item.partition("=")[::2] if isinstance(item, str) else item
    if not (isinstance(alias, str) and isinstance(target, str) and alias and target):
        raise TypeError("a table alias = target, or alias=target strings")
    return alias.strip().lower(), target.strip()


GsRoots = tuple[tuple[str, str], ...]


def _gs_roots(v: Any) -> GsRoots:
    """(bucket, folder) pairs from "bucket=DIR" strings (the flag's, comma-separated) or a
    table: where the Vertex surface reads a fileData gs:// object from."""
    items = v.items() if isinstance(v, Mapping) else v
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise TypeError("bucket=DIR strings, or a table bucket = DIR")
    pairs = tuple(_alias_pair(item) for item in items)
    return tuple((bucket, folder) for bucket, folder in pairs)


StorageFaults = tuple[tuple[str, int, int], ...]
STORAGE_OPERATIONS = ("upload", "download", "list", "delete")


def _storage_faults(v: Any) -> StorageFaults:
    """(operation, HTTP status, how many) from "OP=STATUS" or "OP=STATUSxN" strings: the first
    N requests of that kind answer the status (0: every one)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, Iterable):
        raise TypeError("OP=STATUS[xN] strings")
    return tuple(_storage_fault(item) for item in items)


def _storage_fault(item: Any) -> tuple[str, int, int]:
    found = re.fullmatch(r"(\w+)=([1-5]\d\d)(?:x(\d+))?", str(item).strip())
    if found is None or found[1] not in STORAGE_OPERATIONS:
        raise TypeError(f"OP=STATUS[xN] strings, OP one of {', '.join(STORAGE_OPERATIONS)}")
    return found[1], int(found[2]), int(found[3] or 0)


StorageStalls = tuple[tuple[str, int], ...]


def _storage_stalls(v: Any) -> StorageStalls:
    """(operation, how many) from "OP" or "OPxN" strings: the first N requests of that kind
    stall (0: every one)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, Iterable):
        raise TypeError("OP[xN] strings")
    return tuple(_storage_stall(item) for item in items)


def _storage_stall(item: Any) -> tuple[str, int]:
    found = re.fullmatch(r"(\w+?)(?:x(\d+))?", str(item).strip())
    if found is None or found[1] not in STORAGE_OPERATIONS:
        raise TypeError(f"OP[xN] strings, OP one of {', '.join(STORAGE_OPERATIONS)}")
    return found[1], int(found[2] or 0)


_SECRET = frozenset({"api_key"})  # never echoed, not even when refused


def _checked(option: dataclasses.Field, value: Any) -> Any:
    """`value` by its declaration; ValueError naming the option otherwise."""
    try:
        return check_value(option, value)
    except TypeError as exc:
        got = "" if option.name in _SECRET else f", got {value!r}"
        raise ValueError(f"{option.name} must be {exc}{got}") from None


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """The options a config's `[local]` section sets (every one has a default)."""

    latency_ms: float = setting(
        0.0, _AT_LEAST_ZERO, "mean added latency in ms (seeded lognormal)", type=float
    )
    fault_rate: float = setting(0.0, _SHARE, "share of requests given a fault (0-1)", type=float)
    seed: int = setting(0, s.integer, "seed of latency and fault draws", type=int)
    rpm: int | None = setting(
        None, _limit, "requests per minute per model, calendar-minute windows (0: none)", type=int
    )
    tpm: int | None = setting(None, _limit, "input tokens per minute per model (0: none)", type=int)
    rpd: int | None = setting(
        None, _limit, "requests per day per model, to midnight Pacific (0: none)", type=int
    )
    replay: str | None = setting(
        None,
        s.optional(s.text),
        'JSONL of {"sha256", "text", "finish_reason"} answers, by image sha256',
        path=True,
    )
    decode_limit: int | None = setting(
        None,
        _limit,
        "Interactions: output tokens of one request at most; longer answers come in "
        "requires_continuation hops (0: none)",
        type=int,
    )
    credit_budget_usd: float | None = setting(
        None,
        _BUDGET,
        "prepaid credits in USD, spent at the model table's prices; then every generation "
        "answers 402 (payment_required)",
        type=float,
    )
    file_ttl_seconds: float = setting(
        48 * 3600.0,
        _POSITIVE,
        "uploaded files expire (then answer 403 PERMISSION_DENIED) after this long; 48 h",
        type=float,
    )
    hang_seconds: float = setting(
        300.0, _AT_LEAST_ZERO, "how long a hang fault holds a request (then a 504)", type=float
    )
    quota_window_seconds: float = setting(
        60.0,
        _POSITIVE,
        "the length of the rpm/tpm window: 60 as the service counts; shorter only to test or "
        "benchmark minute-window behaviour in seconds",
        type=float,
    )
    batch_seconds: float = setting(
        10.0,
        _AT_LEAST_ZERO,
        "Batch Mode: a job is PENDING, then RUNNING, and SUCCEEDED after this many seconds",
        type=float,
    )
    batch_expiry_seconds: float = setting(
        48 * 3600.0,
        _POSITIVE,
        "Batch Mode: a job not done after this many seconds ends EXPIRED, without results (48 h)",
        type=float,
    )
    batch_max_jobs: int = setting(
        100,
        _POSITIVE_COUNT,
        "Batch Mode: unfinished jobs at once (100); one more is a 429",
        type=int,
    )
    implicit_cache: bool = setting(
        False,
        s.flag,
        "report a prompt prefix repeated within 5 minutes (system instruction, then parts in "
        "order; at least the model's caching minimum) as cachedContentTokenCount, billed at the "
        "cached rate (rule billing.implicit-cache)",
        type=bool,
    )
    batch_enqueued_tokens: int | None = setting(
        None,
        _limit,
        "Batch Mode: input tokens of a model's unfinished jobs at most; beyond, a 429",
        type=int,
    )
    batch_output_delay_seconds: float = setting(
        0.0,
        _AT_LEAST_ZERO,
        "Batch Mode: a job reports SUCCEEDED (and done) this many seconds before its output "
        "(results file or inline answers) is attached, as seen live (tidyverse/ellmer#926)",
        type=float,
    )
    batch_list_lag_seconds: float = setting(
        0.0,
        _AT_LEAST_ZERO,
        "Batch Mode: a new job shows in the job list (GET batches) only this many seconds after "
        "its create; get finds it at once (rule batch.list-lag)",
        type=float,
    )
    batch_create_delay_seconds: float = setting(
        0.0,
        _AT_LEAST_ZERO,
        "Batch Mode: a create's answer is held this many seconds, the job already made (rule "
        "batch.create-delay)",
        type=float,
    )
    batch_corrupt_line: int | None = setting(
        None,
        _limit,
        "Batch Mode fault: the Nth result of every job is unreadable (a results file's line cut "
        "in half, an inline answer that is no object); 0: none",
        type=int,
    )
    alias_target: AliasTargets = setting(
        (),
        _alias_targets,
        "aliases whose target models.get states (its baseModelId), comma-separated "
        "alias=target (gemini-flash-latest=gemini-3.8-flash); the double then answers the alias "
        "as that model. Unset, an alias's resource names only itself, as the service's do",
        type=_kinds,
    )
    simulate: str = setting(
        "none",
        s.one_of(*SIMULATIONS),
        "settings: answers degrade, seeded, with what the request's setting would lose (a "
        "smaller or lower-resolution view: coarser boxes and masks, small objects missed; lite "
        "models: more misses and label slips; rule simulation.settings); none: exact answers",
    )

    def __post_init__(self) -> None:
        """Every value checked, and normalised (0 for "no limit" becomes None), by its
        declaration: the same check whether it came from a flag, a config or Python."""
        for option in declared(type(self)):
            object.__setattr__(self, option.name, _checked(option, getattr(self, option.name)))


@dataclass(frozen=True, slots=True)
class ServerOptions(LocalOptions):
    """Everything a local server takes: the `[local]` options and those of a server of its own."""

    host: str = setting("127.0.0.1", _string, "address to listen on")
    port: int = setting(0, _PORT, "0 picks a free port", type=int)
    api_key: str | None = setting(
        None, _api_key, "accept only this key (default: any non-empty key)"
    )
    fault_kinds: tuple[str, ...] = setting(
        FAULT_KINDS,
        s.texts,
        f"comma-separated faults that may be injected (default all: {','.join(FAULT_KINDS)})",
        type=_kinds,
    )
    inline_limit_bytes: int = setting(
        100 * _MIB,
        _POSITIVE_COUNT,
        "largest request body of generateContent, countTokens and Interactions; the flag takes "
        "MiB (100: the live service's interactive limit since 2026-01)",
        type=_mebibytes,
    )
    batch_inline_limit_bytes: int = setting(
        20 * _MIB,
        _POSITIVE_COUNT,
        "largest batchGenerateContent body (its inline requests), and never above "
        "--inline-limit-mb; the flag takes MiB (20: Batch Mode's inline limit)",
        type=_mebibytes,
    )
    file_processing_seconds: float = setting(
        0.0, _AT_LEAST_ZERO, "uploaded files stay PROCESSING this long", type=float
    )
    service_account: str | None = setting(
        None,
        s.optional(_string),
        "Vertex: a service-account key file (JSON) whose RS256-signed JWTs POST /token "
        "exchanges for bearer tokens (its token_uri may point there); unset, /token refuses",
    )
    token_seconds: int = setting(
        3600, _POSITIVE_COUNT, "Vertex: how long a token /token issues lives", type=int
    )
    gs_root: GsRoots = setting(
        (),
        _gs_roots,
        "Vertex: comma-separated bucket=DIR, the folders fileData gs://bucket/... objects are "
        "read from (as Vertex reads Cloud Storage itself)",
        type=_kinds,
    )
    vertex_batch_end: str | None = setting(
        None,
        s.optional(s.one_of("FAILED", "PARTIALLY_SUCCEEDED")),
        "Vertex batch fault: a job whose lines are all answered ends in this state instead of "
        "SUCCEEDED, its answers written as its predictions (after --batch-output-delay, as a "
        "succeeded job's)",
        type=str,
    )
    storage_fault: StorageFaults = setting(
        (),
        _storage_faults,
        "Cloud Storage fault: comma-separated OP=STATUS[xN] (OP upload, download, list or "
        "delete): the first N such requests (every one without xN) answer that HTTP status",
        type=_kinds,
    )
    storage_stall: StorageStalls = setting(
        (),
        _storage_stalls,
        "Cloud Storage stall: comma-separated OP[xN] (OP upload, download, list or delete): the "
        "first N such requests (every one without xN) are taken and never answered (a download "
        "stops after half its bytes) until the client gives up or the server stops",
        type=_kinds,
    )
    answer_log: str | None = setting(
        None,
        s.optional(_string),
        "append one JSON line per delivered (paid) answer: time and the images' sha256, to audit "
        "what a client paid for against what it kept",
    )

    def __repr__(self) -> str:  # the key never appears in logs or reprs
        key = "None" if self.api_key is None else "'***'"
        shown = ", ".join(
            f"{name}={key if name == 'api_key' else repr(getattr(self, name))}"
            for name in self.__dataclass_fields__
        )
        return f"ServerOptions({shown})"
