"""`pipeline prune OUT --config C [--apply]`: rows whose input disappeared, set aside.

A file deleted (or moved) upstream keeps its row current forever otherwise: no run sees it
again to supersede it. Prune walks the config's inputs as a run does (a stat each, nothing
read), and the current rows whose (root, path) the walk no longer yields are moved out of
`data/` into `.superseded/` — they were paid for, so the resume index still reuses them should
the file come back. Without `--apply` it only counts (the dry run comes first).

Only roots the walk found at least one file under are judged: a root that yields nothing (an
unmounted disk, a bucket without credentials, another config's folder) looks exactly like one
whose every file was deleted, and its rows are left alone, counted as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.inputs.checks import check_groups
from pipeline.inputs.source import work_units
from pipeline.output.compact import set_aside
from pipeline.output.parts import GROUP, current_rows
from pipeline.output.stores import Store
from pipeline.records import work_identity

SHOWN = 5  # paths named in the report


def prune(config: Config, output: str | Store, *, apply: bool = False) -> dict[str, Any]:
    """Count (and with `apply`, set aside) the current rows of inputs that disappeared."""
    check_groups(config)
    roots, present = _walked(config)
    rows = current_rows(output, GROUP)
    gone = _gone(rows, roots, present)
    unwalked = ~_in(rows.column("image_root"), roots)
    report: dict[str, Any] = {
        "output": str(output),
        "rows": rows.num_rows,
        "gone": int(gone.sum()),
        "examples": rows.column("image_path").filter(pa.array(gone)).to_pylist()[:SHOWN],
        "roots_not_walked": sorted(set(rows.column("image_root").filter(unwalked).to_pylist())),
        "rows_left_alone": int(unwalked.sum()),
        "applied": False,
    }
    if apply and report["gone"]:
        moved = set_aside(output, lambda table: _gone(table, roots, present))
        report.update(applied=True, **moved)
    return report


def _walked(config: Config) -> tuple[pa.Array, pa.Array]:
    """(the roots the walk found files under, every "root NUL path" it yielded)."""
    roots: set[str] = set()
    present: list[str] = []
    for work in work_units(config.input):
        root, path = work_identity(work)[:2]
        roots.add(root)
        present.append(f"{root}\0{path}")
    return pa.array(sorted(roots), pa.string()), pa.array(present, pa.string())


def _gone(table: pa.Table, roots: pa.Array, present: pa.Array) -> np.ndarray:
    """Rows under a walked root whose path the walk did not yield (any task: a file's rows go
    together)."""
    joined = pc.binary_join_element_wise(table["image_root"], table["image_path"], "\0")
    return _in(table.column("image_root"), roots) & ~_in(joined, present)


def _in(values: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> np.ndarray:
    found = pc.fill_null(pc.is_in(values, value_set=value_set), False)
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def format_prune(report: dict[str, Any]) -> str:
    verb = "set aside" if report["applied"] else "would set aside"
    lines = [
        f"{report['output']}: {report['gone']:,} of {report['rows']:,} current rows are of "
        f"inputs that no longer exist: {verb}"
        + ("" if report["applied"] or not report["gone"] else " (rerun with --apply)")
    ]
    if report["examples"]:
        lines.append("  e.g. " + ", ".join(report["examples"]))
    if report["rows_left_alone"]:
        lines.append(
            f"  {report['rows_left_alone']:,} rows under roots the walk found nothing in were "
            f"left alone (a missing disk looks the same): {', '.join(report['roots_not_walked'])}"
        )
    if report["applied"]:
        lines.append(
            f"  moved to .superseded/ (paid answers, still reused if a file comes back); "
            f"{report['parts_rewritten']} parts rewritten"
        )
    return "\n".join(lines)
