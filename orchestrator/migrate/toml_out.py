"""Writing the generated orch.toml: tasks with keys, an env table and comments."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["Task", "render", "toml_key", "toml_value"]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A bare key when TOML allows it, else a quoted one."""
    return key if _BARE.fullmatch(key) else toml_value(key)


def toml_value(value: object) -> str:
    """A TOML literal for a str, bool, int, float or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def comment(text: str) -> str:
    """``# text`` on as many lines as it has."""
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines() or [""])


@dataclass
class Task:
    """One ``[tasks.NAME]`` table being built."""

    name: str
    keys: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)


def render(source: str, kind: str, tasks: list[Task], notes: list[str]) -> str:
    """The whole orch.toml text."""
    out = [
        comment(f"orch.toml imported from {source} ({kind}) by `orch import`."),
        comment("Lines starting with '#' list what has no orch equivalent: review them."),
    ]
    for text in notes:
        out.append(comment(text))
    for task in tasks:
        out.append("")
        out.append(f"[tasks.{toml_key(task.name)}]")
        for key, value in task.keys.items():
            out.append(f"{toml_key(key)} = {toml_value(value)}")
        for text in task.notes:
            out.append(comment(text))
        if task.env:
            out.append(f"[tasks.{toml_key(task.name)}.env]")
            for key, value in task.env.items():
                out.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(out) + "\n"
