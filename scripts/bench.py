"""Benchmarks of the pipeline, side by side with what users would write instead.

    python scripts/bench.py {throughput,latency,rate,memory,resume,profile,...,all}
        [--quick | --smoke] [--keep] [--no-record] [--photos N]
    python scripts/bench.py --list        the subcommands, one a line

The size convention, which every subcommand follows (a new one included):
- no flag: the full sizes, the figures docs/benchmarks.md reports;
- `--quick`: smaller, so that `all --quick` fits in 10 minutes on a 2-core machine;
- `--smoke`: the tiniest sizes that still run every step (a handful of images, a second of
  load), never recorded: tests/test_benchmarks_smoke.py runs every subcommand `--list` names
  so, so that none can rot unseen. A benchmark declares them as `Benchmark(..., smoke=Sizes(...))`
  (scripts/benchmarks/__init__.py); one without is refused by `--smoke`, and the test fails.

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

from benchmarks import BENCHMARKS, photos  # noqa: E402
from benchmarks.harness import run_benchmark, use_compiled_bytecode  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--list", action="store_true", help="print the subcommands and exit")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes, for a laptop")
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes, never recorded")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-record", action="store_true", help="do not append to the results")
    parser.add_argument(
        "--photos", type=int, metavar="N", help="photos only: N camera JPEGs (full 300, quick 40)"
    )
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    if args.command is None:
        parser.error("a command is required (or --list)")
    names = list(BENCHMARKS) if args.command == "all" else [args.command]
    if args.photos is not None:
        if args.command != "photos" or args.photos < 1:
            parser.error("--photos N (N >= 1) goes with the photos command only")
        BENCHMARKS["photos"] = photos.with_jpegs(BENCHMARKS["photos"], args.photos)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    use_compiled_bytecode(ROOT)
    started = time.perf_counter()
    for name in names:
        run_benchmark(name, BENCHMARKS[name], size=size, keep=args.keep, save=not args.no_record)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
