"""A/B of the client's cost: `pipeline run` from two checkouts, alternating, against one replaying
local server, so what differs between the runs is the client's code alone.

    python scripts/ab_client_cpu.py BEFORE_TREE AFTER_TREE [--images 1500] [--pairs 10]

Each tree is a checkout of this repository (e.g. `git worktree add /tmp/before <commit>`); each is
run with PYTHONPATH pointing at it, in this venv, from its compiled bytecode (as an installed
package runs; `benchmarks.harness.use_compiled_bytecode`). The replay file is made once by a run of
the AFTER tree against the analysing server (the answers are the same bytes' answers for both). For
each run: the client's CPU (user + sys of the `pipeline run` process, from wait4) per image, and
images/s of wall time; then the medians. A change on the hot path is measured here side by side
with the commit before it (docs/benchmarks.md): the runs alternate, so a machine that drifts faster
or slower moves both sides alike.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.harness import use_compiled_bytecode
from benchmarks.scenes import make_scenes

SIDE = 384
KEY = "ab-benchmark-key"


def serve(tree: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "pipeline", "serve-local", "--port", "0", "--seed", "1", *extra]
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[-1]  # the server prints its URL first


def config(work: Path, name: str, url: str, images: Path) -> tuple[Path, Path]:
    out, path = work / f"out-{name}", work / f"{name}.toml"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    path.write_text(
        f'[api]\nbase_url = "{url}"\nmodel = "gemini-2.5-flash"\n[limits]\nconcurrency = 32\n'
        f'[input]\npaths = ["{images}"]\n[task]\nkind = "segment"\n[output]\ndir = "{out}"\n'
    )
    return path, out


def run(tree: str, path: Path, images: int) -> tuple[float, float]:
    """(client CPU ms an image, images/s) of one `pipeline run`."""
    env = {**os.environ, "PYTHONPATH": tree, "GEMINI_API_KEY": KEY}
    started = time.perf_counter()
    # cwd=tree too: `python -m` puts the working folder ahead of PYTHONPATH, so from another
    # folder both sides would run that folder's code
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(path), "--quiet"], env=env, cwd=tree
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, f"{tree}: pipeline run failed ({status})"
    wall = time.perf_counter() - started
    return (usage.ru_utime + usage.ru_stime) / images * 1000, images / wall


def replay_file(work: Path, tree: str, images: Path, count: int) -> Path:
    """The analysing server's answers by image sha256, for the replaying server."""
    replay = work / "replay.jsonl"
    server, url = serve(tree)
    try:
        path, out = config(work, "analysed", url, images)
        run(tree, path, count)
    finally:
        server.terminate()
        server.wait()
    sys.path.insert(0, tree)
    from pipeline.gemini.client import parse_generate_content

    with replay.open("w") as fh:
        for part in glob.glob(str(out / "data" / "*.parquet")):
            table = pq.read_table(part, columns=["image_sha256", "raw_response"])
            for row in table.to_pylist():
                text = parse_generate_content(row["raw_response"]).text
                fh.write(json.dumps({"sha256": row["image_sha256"], "text": text}) + "\n")
    return replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    use_compiled_bytecode(Path(args.before), Path(args.after))
    with tempfile.TemporaryDirectory(prefix="gvp-ab-") as tmp:
        work = Path(tmp)
        images = work / "scenes"
        make_scenes(images, args.images, SIDE)
        replay = replay_file(work, args.after, images, args.images)
        server, url = serve(args.after, "--replay", str(replay))
        trees = {"before": args.before, "after": args.after}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        try:
            for pair in range(args.pairs):
                for name in ("before", "after") if pair % 2 else ("after", "before"):
                    path, _ = config(work, name, url, images)
                    results[name].append(run(trees[name], path, args.images))
                    cpu, rate = results[name][-1]
                    print(f"{name:6}  {cpu:6.3f} ms/image  {rate:7.1f} images/s", flush=True)
        finally:
            server.terminate()
            server.wait()
    for name, runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"{name}: median client CPU {cpu:.3f} ms/image, {rate:.1f} images/s ({trees[name]})")


if __name__ == "__main__":
    main()
