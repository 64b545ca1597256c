"""The project's one markdown table writer.

It sits in layer 0 and imports nothing of the package, so that evaluation (a lower layer than the
commands) and the commands write their tables the same way without importing upward.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: the header, the separator, one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
