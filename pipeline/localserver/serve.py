"""The local server's command line: `pipeline serve-local`, `python -m pipeline.localserver`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from pipeline.localserver.faults import FAULT_KINDS
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.rules import describe_rules
from pipeline.localserver.server import LocalServer, bind_socket

_DEFAULTS = ServerOptions()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags, shared by `pipeline serve-local` and `python -m pipeline.localserver`."""
    parser.add_argument("--host", default=_DEFAULTS.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=_DEFAULTS.port, help="0 picks a free port")
    parser.add_argument(
        "--api-key", default=None, help="accept only this key (default: any non-empty key)"
    )
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute per model")
    parser.add_argument("--tpm", type=int, default=None, help="input tokens per minute per model")
    parser.add_argument("--rpd", type=int, default=None, help="requests per day per model")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="mean added latency (seeded lognormal)"
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of requests given a fault (0-1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of latency and fault draws")
    parser.add_argument(
        "--fault-kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated faults that may be injected (default all: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=_DEFAULTS.hang_seconds,
        help="how long a hang fault holds a request",
    )
    parser.add_argument(
        "--replay", default=None, help='JSONL of {"sha256", "text", "finish_reason"} answers'
    )
    parser.add_argument(
        "--inline-limit-mb",
        type=float,
        default=_DEFAULTS.inline_limit_bytes / 2**20,
        help="largest request body in MiB (20 as in the guide; the live service takes 100)",
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
        "--file-processing-seconds",
        type=float,
        default=0.0,
        help="uploaded files stay PROCESSING this long",
    )
    parser.add_argument(
        "--file-ttl-seconds",
        type=float,
        default=_DEFAULTS.file_ttl_seconds,
        help="uploaded files expire (then answer 403 PERMISSION_DENIED) after this long; 48 h",
    )
    parser.add_argument(
        "--decode-limit",
        type=int,
        default=None,
        metavar="N",
        help="Interactions: at most N output tokens per request; longer answers come in "
        "requires_continuation hops",
    )
    parser.add_argument(
        "--credit-budget",
        type=float,
        default=None,
        metavar="USD",
        help="prepaid credits in USD, spent at the model table's prices; then every generation "
        "answers 402 (payment_required)",
    )
    parser.add_argument(
        "--answer-log",
        metavar="FILE",
        help="append one JSON line per delivered (paid) answer: time and the images' sha256, "
        "to audit what a client paid for against what it kept",
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=_DEFAULTS.batch_seconds,
        metavar="S",
        help="Batch Mode: a job is PENDING, then RUNNING, and SUCCEEDED after S seconds",
    )
    parser.add_argument(
        "--batch-expiry-seconds",
        type=float,
        default=_DEFAULTS.batch_expiry_seconds,
        metavar="S",
        help="Batch Mode: a job not done after S seconds ends EXPIRED, without results (48 h)",
    )
    parser.add_argument(
        "--batch-max-jobs",
        type=int,
        default=_DEFAULTS.batch_max_jobs,
        metavar="N",
        help="Batch Mode: unfinished jobs at once (100); one more is a 429",
    )
    parser.add_argument(
        "--batch-enqueued-tokens",
        type=int,
        default=None,
        metavar="N",
        help="Batch Mode: input tokens of a model's unfinished jobs at most; beyond, a 429",
    )
    parser.add_argument(
        "--quota-window-seconds",
        type=float,
        default=_DEFAULTS.quota_window_seconds,
        help="the length of the --rpm/--tpm window: 60 as the service counts; shorter only to "
        "test or benchmark minute-window behaviour in seconds",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="print every rule the server enforces, with its source, and exit",
    )


def serve_from_args(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM. The first stdout line names the base URL."""
    if getattr(args, "rules", False):
        print("\n".join(describe_rules()))
        return 0
    try:
        options = _options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workers = getattr(args, "workers", 1)
    if workers < 1 or (workers > 1 and _per_process_state(options)):
        print(
            "error: --workers must be >= 1, and 1 with --rpm/--tpm/--rpd/--credit-budget/"
            "--decode-limit (their state is per process)",
            file=sys.stderr,
        )
        return 2
    try:
        sock = bind_socket(options.host, options.port)
        children = []
        for _ in range(workers - 1):
            sys.stdout.flush()
            pid = os.fork()  # before any event loop exists
            if pid == 0:  # a worker: serve quietly until told to stop, or orphaned
                os._exit(asyncio.run(_serve(options, sock, announce=False)))
            children.append(pid)
        try:
            return asyncio.run(_serve(options, sock, announce=True))
        finally:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
    except OSError as exc:
        print(f"error: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a malformed replay file
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _per_process_state(options: ServerOptions) -> bool:
    """Options whose counters a second process would not share (a continuation token issued by
    one worker is unknown to the others)."""
    limits = (options.rpm, options.tpm, options.rpd, options.decode_limit)
    return any(limits) or options.credit_budget_usd is not None


def _options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        rpm=args.rpm,
        tpm=args.tpm,
        rpd=args.rpd,
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip()),
        seed=args.seed,
        hang_seconds=args.hang_seconds,
        replay=args.replay,
        inline_limit_bytes=int(args.inline_limit_mb * 2**20),
        file_processing_seconds=args.file_processing_seconds,
        file_ttl_seconds=args.file_ttl_seconds,
        decode_limit=args.decode_limit,
        credit_budget_usd=args.credit_budget,
        answer_log=args.answer_log,
        batch_seconds=args.batch_seconds,
        batch_expiry_seconds=args.batch_expiry_seconds,
        batch_max_jobs=args.batch_max_jobs,
        batch_enqueued_tokens=args.batch_enqueued_tokens,
        quota_window_seconds=args.quota_window_seconds,
    )


async def _serve(options: ServerOptions, sock: socket.socket, *, announce: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalServer(options, sock=sock) as server:
        if not announce:
            parent = os.getppid()
            while not stop.is_set() and os.getppid() == parent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            return 0
        print(f"Local Gemini-compatible server listening on {server.base_url}", flush=True)
        print(
            f"  /v1, /v1beta, /v1alpha; key: {'required' if options.api_key else 'any'}; "
            f"rpm={options.rpm} tpm={options.tpm} rpd={options.rpd} "
            f"latency={options.latency_ms}ms fault_rate={options.fault_rate} seed={options.seed} "
            f"decode_limit={options.decode_limit} credit_budget={options.credit_budget_usd} "
            f"batch_seconds={options.batch_seconds}"
            f"{' replay=' + options.replay if options.replay else ''}. Ctrl-C stops.",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    print("Local server stopped.", file=sys.stderr, flush=True)
    return 0
