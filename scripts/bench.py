"""Benchmarks of the pipeline, side by side with what users would write instead.

    python scripts/bench.py {throughput,latency,rate,memory,resume,profile,all} [--quick]
        [--keep] [--no-record]

Every subcommand starts its own local Gemini-compatible server in a separate process
(`python -m pipeline serve-local --port 0 ...`), generates its own seeded images under a temporary
directory (never committed), runs the pipeline the way users run it (`python -m pipeline run
CONFIG --base-url URL` in a subprocess, with a generated TOML config), prints a table and appends
one JSON record (command, machine, figures, git commit) to docs/bench-results.jsonl.
`--quick` shrinks every size so that `all --quick` fits in 10 minutes on a 2-core machine.
docs/benchmarks.md explains every figure and what exactly is measured.

This file only reads the command line: the harness and one module per benchmark are in
scripts/benchmarks/ (its __init__.py lists them and says how to add one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.harness import run_benchmark  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a laptop")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it still run?")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-record", action="store_true", help="do not append to the results")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.command == "all" else [args.command]
    started = time.perf_counter()
    for name in names:
        run_benchmark(
            name,
            BENCHMARKS[name],
            quick=args.quick,
            keep=args.keep,
            save=not args.no_record,
            smoke=args.smoke,
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
