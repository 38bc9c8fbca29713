"""The error every export raises for what the user must change: apart from dataset.py (which
reads the rows: pyarrow), so that the CLI catches it without importing an export."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says what to change."""
