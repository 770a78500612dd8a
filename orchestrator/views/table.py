"""Plain aligned text tables for ``orch status``: fast for thousands of rows.

A rich table renders a 1,000-row status in about a second; a status command
must answer in well under 150 ms, so rows are laid out here with computed
column widths, and colour (state names only) is added with ANSI codes only
when stdout is a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

_COLOURS = {
    "done": "32",
    "failed": "31",
    "running": "36",
    "stopped": "33",
    "lost": "35",
    "backoff": "33",
    "stopping": "33",
}


def colour_enabled(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def state(text: str, on: bool) -> str:
    code = _COLOURS.get(text)
    return f"\x1b[{code}m{text}\x1b[0m" if on and code else text


def render(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    out: TextIO | None = None,
    state_col: int | None = None,
    last_free: bool = True,
) -> None:
    """Print ``rows`` under ``header``, columns separated by two spaces.

    The last column is not padded (``last_free``), so a long reason does not
    widen every line; the state column is coloured on a terminal.
    """
    out = out or sys.stdout
    on = colour_enabled(out)
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    ncols = len(header)
    lines = []
    for row in [header, *rows]:
        parts = []
        for i, cell in enumerate(row):
            if i == ncols - 1 and last_free:
                parts.append(cell)
                continue
            pad = " " * (widths[i] - len(cell))
            parts.append((state(cell, on) if i == state_col and row is not header else cell) + pad)
        lines.append("  ".join(parts).rstrip())
    out.write("\n".join(lines) + "\n")
