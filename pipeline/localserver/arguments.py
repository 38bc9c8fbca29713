"""The server's command-line flags, declared from its options (options.py) without importing the
server: `pipeline --help` and `pipeline run` build the `serve-local` parser too, and the server's
modules (aiohttp's web side, jsonschema, the local "model") cost ~0.2 s to import."""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.localserver.options import ServerOptions
from pipeline.settings import declared

# Flags named otherwise than their option (scripts and the README use these names).
_RENAMED = {
    "credit_budget_usd": "--credit-budget",
    "inline_limit_bytes": "--inline-limit-mb",
    "batch_inline_limit_bytes": "--batch-inline-limit-mb",
    "batch_output_delay_seconds": "--batch-output-delay",
    "batch_list_lag_seconds": "--batch-list-lag",
    "batch_create_delay_seconds": "--batch-create-delay",
}


def flag_of(option: dataclasses.Field) -> str:
    return _RENAMED.get(option.name, "--" + option.name.replace("_", "-"))


def dest_of(option: dataclasses.Field) -> str:
    """Where argparse keeps the flag's value (its default `dest`, so its help shows the flag)."""
    return flag_of(option).removeprefix("--").replace("-", "_")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags, shared by `pipeline serve-local` and `python -m pipeline.localserver`:
    one per option declared in options.py (checked when the options are made), then the
    process's own."""
    for option in declared(ServerOptions):
        meta = option.metadata
        if meta["type"] is bool:  # a switch, off unless given (--implicit-cache)
            parser.add_argument(flag_of(option), action="store_true", help=meta["doc"])
            continue
        parser.add_argument(
            flag_of(option), type=meta["type"], default=option.default, help=meta["doc"]
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port, for throughput benchmarks: quotas, credits, "
        "continuations, uploaded files, batch jobs and stats are per process, so those flags "
        "(and Batch Mode) need 1 worker",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="print every rule the server enforces, with its source, and exit",
    )
