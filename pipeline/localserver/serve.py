"""The local server's command line: `pipeline serve-local`, `python -m pipeline.localserver`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from pipeline.localserver.arguments import dest_of
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.rules import describe_rules
from pipeline.localserver.server import LocalServer, bind_socket
from pipeline.settings import declared


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
            "--decode-limit/--implicit-cache/--service-account (their state is per process)",
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
    one worker is unknown to the others, and so is a Vertex bearer token)."""
    limits = (options.rpm, options.tpm, options.rpd, options.decode_limit)
    shared = options.credit_budget_usd is not None or options.implicit_cache
    return any(limits) or shared or options.service_account is not None


def _options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(**{o.name: getattr(args, dest_of(o)) for o in declared(ServerOptions)})


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
            f"batch_seconds={options.batch_seconds} implicit_cache={options.implicit_cache} "
            f"simulate={options.simulate}"
            f"{' replay=' + options.replay if options.replay else ''}. Ctrl-C stops.",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    print("Local server stopped.", file=sys.stderr, flush=True)
    return 0
