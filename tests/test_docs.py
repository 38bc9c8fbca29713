"""docs/python-api.md runs as written: its code blocks are a notebook's cells, run in order in
one namespace, each inside a running event loop as a Jupyter kernel runs a cell (top-level
`await` compiled as IPython compiles it), from a copy of the repository's samples."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "python-api.md"
CELL = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def cells(path: Path) -> list[str]:
    return CELL.findall(path.read_text())


async def run_cell(source: str, namespace: dict[str, Any]) -> None:
    """A cell as a kernel runs it: in the running loop, awaited when it awaits."""
    code = compile(source, "<cell>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if result is not None:  # a cell with a top-level await compiles to a coroutine
        await result


async def test_the_notebook_runs_and_prints_what_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "data" / "samples", tmp_path / "data" / "samples")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    printed = []
    for source in cells(DOC):
        await run_cell(source, namespace)
        printed.append(capsys.readouterr().out.strip())
    images = len([p for p in (tmp_path / "data" / "samples").rglob("*") if p.is_file()])
    assert len(printed) == 5
    # more/copy-of-shapes-01.png is a twin: the plan buys it once and copies it, free
    assert printed[0].startswith(f"{images - 1} images to buy, about ")
    assert printed[1] == "{'ok': 4} exit code 0"
    assert printed[2] == f"4 skipped, {images - 4} new rows"
    assert printed[3].startswith(f"{images} rows; more/copy-of-shapes-01.png ['"), printed[3]
    assert printed[4] == "overrides: [limits] concurrency must be a positive integer, got 0"
