"""Reading orch.toml: the file's tables, unknown keys with their line, TOML errors.

Only the shape is checked here (which tables and keys exist); values are
converted and validated by ``config.build_task`` for the task being run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError, closest
from orchestrator.settings import KEYS

if TYPE_CHECKING:
    from orchestrator.opsconfig import OpsConfig

CONFIG_NAME = "orch.toml"

#: A task name: letters, digits, "_", "-", ".".
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Top-level tables besides [tasks.NAME]: [notify.NAME] channels, [gc] pruning.
TABLES = ("tasks", "notify", "gc")
#: Task keys read by their own modules (notifications, schedules), not by ``build_task``;
#: kept apart in ``ConfigFile.extras`` so ``ConfigFile.tasks`` holds only ``KEYS``.
TASK_EXTRAS = (
    "notify",
    "schedule",
    "every",
    "overlap",
    "catch_up",
    "starting_deadline",
    "on_incomplete",
)


# ----------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class ConfigFile:
    """A parsed orch.toml: its absolute path and its key-validated task tables."""

    path: str
    tasks: Mapping[str, Mapping[str, Any]]
    #: Per task, its ``TASK_EXTRAS`` keys; and the top-level tables other than ``tasks``.
    extras: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tables: Mapping[str, Any] = field(default_factory=dict)
    #: Notify channels, schedules and ``[gc]``, parsed and validated when the file was read.
    ops: OpsConfig | None = None

    def task(self, name: str) -> Mapping[str, Any]:
        """The raw table of task ``name``; an unknown name fails with a did-you-mean."""
        if name in self.tasks:
            return self.tasks[name]
        known = ", ".join(self.tasks) or "none defined"
        raise ConfigError(
            f"unknown task {name!r} in {display(self.path)} (known: {known}"
            f"{did_you_mean(name, list(self.tasks), sep='; ')})"
        )


def find_config(explicit: str | None, cwd: str) -> str | None:
    """The explicit path if given, else ``orch.toml`` in ``cwd`` if it exists, else None."""
    if explicit is not None:
        return os.path.join(cwd, explicit)
    candidate = os.path.join(cwd, CONFIG_NAME)
    return candidate if os.path.isfile(candidate) else None


def read_file(path: str) -> bytes:
    """The bytes of a file the user named; what stops the read is one line naming it."""
    shown = display(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read ({exc.strerror or exc})") from None


def load_config(path: str) -> ConfigFile:
    """Read and parse orch.toml, rejecting unknown keys with their line and a did-you-mean.

    Values are type-checked later, by ``build_task``, for the task being run.
    """
    shown = display(path)
    data = read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{shown}:{line}: not valid UTF-8") from None
    import tomllib  # only when there is a file to read: `orch run -- CMD` has none

    try:
        doc = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(shown, str(exc))) from None
    for key in doc:
        if key not in TABLES:
            raise ConfigError(
                f"{shown}{_line_of(text, key, None)}: unknown top-level key {key!r} (orch.toml "
                f"holds [tasks.NAME] tables{did_you_mean(key, list(TABLES), sep='; ')})"
            )
    tasks = doc.get("tasks", {})
    if not isinstance(tasks, dict):
        raise ConfigError(f"{shown}{_line_of(text, 'tasks', None)}: 'tasks' must be a table")
    for name, table in tasks.items():
        where = f"{shown}{_section_line(text, name)}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [tasks.{name}] must be a table, got {kind_of(table)}")
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: task name {name!r}: use letters, digits, '_', '-', '.'")
        for key in table:
            if key not in KEYS and key not in TASK_EXTRAS:
                raise ConfigError(
                    f"{shown}{_line_of(text, key, name)}: unknown key {key!r} in [tasks.{name}]"
                    f"{did_you_mean(key, [*KEYS, *TASK_EXTRAS], sep=' (', end=')')}"
                )
    from orchestrator.opsconfig import check_ops  # notify, schedules, gc: validated on every read

    extras = {n: {k: v for k, v in t.items() if k in TASK_EXTRAS} for n, t in tasks.items()}
    tables = {key: value for key, value in doc.items() if key != "tasks"}
    ops = check_ops(tables, extras, shown)
    tasks = {n: {k: v for k, v in t.items() if k not in TASK_EXTRAS} for n, t in tasks.items()}
    return ConfigFile(
        path=os.path.abspath(path), tasks=tasks, extras=extras, tables=tables, ops=ops
    )


def _toml_error(shown: str, message: str) -> str:
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return f"{shown}:{match.group(2)}:{match.group(3)}: {match.group(1)}"
    return f"{shown}: {message.replace('end of document', 'end of file')}"


def _quoted(name: str) -> str:
    return rf"(?:{re.escape(name)}|\"{re.escape(name)}\"|'{re.escape(name)}')"


def _section(text: str, name: str) -> re.Match[str] | None:
    """Where [tasks.NAME] (or a dotted/inline form) is in the text; tomllib gives no positions."""
    quoted = _quoted(name)
    return re.search(rf"^\s*\[\s*tasks\s*\.\s*{quoted}\s*\]", text, re.MULTILINE) or re.search(
        rf"^\s*(?:tasks\s*\.\s*)?{quoted}\s*[.=]", text, re.MULTILINE
    )


def _section_line(text: str, name: str) -> str:
    """':N' for the line of [tasks.NAME], or '' when it cannot be found."""
    match = _section(text, name)
    return f":{text.count(chr(10), 0, match.start()) + 1}" if match else ""


def _line_of(text: str, key: str, section: str | None) -> str:
    """':N' for the line where ``key`` is set (after [tasks.SECTION] if given), or ''."""
    header = _section(text, section) if section is not None else None
    start = header.end() if header else 0
    name = _quoted(key)
    patterns = (
        rf"^\s*{name}\s*=",
        rf"^\s*\[\s*{name}\s*[.\]]",
        rf"\.\s*{name}\s*\]",
        rf"(?:^|[\s{{,.]){name}\s*=",
    )
    for pattern in patterns:
        match = re.compile(pattern, re.MULTILINE).search(text, start)
        if match:
            return f":{text.count(chr(10), 0, match.end() - 1) + 1}"
    return ""


def display(path: str) -> str:
    """The path relative to the working directory when it lies below it, else absolute."""
    try:
        absolute = os.path.abspath(path)
        relative = os.path.relpath(absolute)
    except (OSError, ValueError):
        return path
    return absolute if relative.startswith("..") else relative


def did_you_mean(word: str, candidates: list[str], *, sep: str, end: str = "") -> str:
    close = closest(word, candidates)
    return f"{sep}did you mean {close!r}?{end}" if close else ""


def kind_of(value: object) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown}" if isinstance(value, int | float | str) and len(shown) < 40 else kind
