"""Small helpers shared by the importers."""

from __future__ import annotations

import re

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def task_name(name: str, taken: set[str]) -> str:
    """An orch task name for ``name`` (letters, digits, '_', '-', '.'), unique in ``taken``."""
    base = _NAME_BAD.sub("_", name.strip()) or "task"
    if base[0] in ".-":
        base = "_" + base
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def braces(text: str) -> str:
    """Escape ``{`` and ``}`` so orch's templating passes them through literally."""
    return text.replace("{", "{{").replace("}", "}}")


def duration(seconds: float) -> str:
    """``10s``, ``1500ms``: what orch.toml durations read best as."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"
