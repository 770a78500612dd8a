"""Command templates: `{field}` substitution into argv elements and env values.

The promise (DESIGN.md #9) is that a shard's values never pass through a
shell: each argv element is rendered on its own and handed to exec as one
element, so a record value like ``x; rm -rf ~`` arrives byte for byte as one
argument. Only when the user asks for ``shell = true`` is a shell involved, and
then every substituted value is ``shlex.quote``d first.

Syntax, deliberately smaller than ``str.format``: ``{name}`` substitutes the
field ``name`` when ``name`` is an identifier (letters, digits, ``_``, not
starting with a digit), optionally dotted (``{checkpoint.page}``,
``{address.city}``) to reach into a JSON value. Every other brace is literal
text -- JSON (``{"total": 10}``), shell ``${VAR}``, awk programs, ``find
-exec {} ;`` -- so commands written for a shell need no escaping. ``{{`` and
``}}`` are literal ``{`` and ``}`` (to write ``{id}`` itself). There are no
format specs or conversions. Templates are compiled once per run and rendered
per attempt by filling precomputed slots and joining.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator.errors import TemplateError, closest

if TYPE_CHECKING:
    from orchestrator.config import TaskConfig
    from orchestrator.sources import Shard, ShardList

__all__ = [
    "BUILTIN_FIELDS",
    "CommandTemplate",
    "Template",
    "check_fields",
    "compile_command",
    "shard_values",
]

#: Fields every shard has, whatever its source; they win over record fields.
BUILTIN_FIELDS = frozenset({"index", "count", "id", "checkpoint"})
_BUILTIN_ORDER = ("index", "count", "id", "checkpoint")

_NUL_HINT = "NUL bytes cannot be passed to a process"


class Template:
    """One compiled template string; immutable once compiled."""

    __slots__ = ("_parts", "_slots", "fields", "text", "where")

    def __init__(
        self, text: str, where: str, parts: list[str], slots: tuple[tuple[int, str], ...]
    ) -> None:
        self.text = text
        self.where = where
        self._parts = parts
        self._slots = slots
        self.fields: frozenset[str] = frozenset(name for _, name in slots)

    @classmethod
    def compile(cls, text: str, *, where: str) -> Template:
        """Compile ``text``: fields are ``{identifier}`` or ``{dotted.identifier}``, not
        after a ``$`` (shell's ``${VAR}``); anything else with braces is literal. Never
        fails: ``where`` names the element in later errors (a missing field)."""
        parts: list[str] = []
        slots: list[tuple[int, str]] = []
        literal: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "{":
                if text.startswith("{{", i):
                    literal.append("{")
                    i += 2
                    continue
                match = None if i and text[i - 1] == "$" else _FIELD.match(text, i)
                if match is None:
                    literal.append("{")
                    i += 1
                    continue
                parts.append("".join(literal))
                literal = []
                slots.append((len(parts), match.group(1)))
                parts.append("")
                i = match.end()
            elif ch == "}":
                literal.append("}")
                i += 2 if text.startswith("}}", i) else 1
            else:
                j = min(_find(text, "{", i), _find(text, "}", i))
                literal.append(text[i:j])
                i = j
        parts.append("".join(literal))
        return cls(text, where, parts, tuple(slots))

    def render(self, values: Mapping[str, str]) -> str:
        """Substitute ``values``; every field must be present (see ``check_fields``)."""
        if not self._slots:
            return self._parts[0]
        parts = self._parts.copy()
        try:
            for index, name in self._slots:
                parts[index] = values[name]
        except KeyError as exc:
            raise TemplateError(f"{self.where}: no value for field {exc.args[0]!r}") from None
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def _find(text: str, ch: str, start: int) -> int:
    pos = text.find(ch, start)
    return len(text) if pos == -1 else pos


#: A field: ``{name}`` or ``{name.key.key}``, names being identifiers.
_FIELD = re.compile(r"\{([A-Za-z_]\w*(?:\.[A-Za-z_0-9]\w*)*)\}", re.ASCII)


class CommandTemplate:
    """A compiled argv template plus env value templates.

    ``render_argv`` returns the argv to exec: one rendered element per template
    element, or ``["/bin/sh", "-c", rendered]`` when compiled with ``shell=True``
    (values quoted). A rendered element or env value with a NUL byte raises
    ``TemplateError``, because exec would silently truncate it.
    """

    __slots__ = ("_argv", "_env", "_scripts", "fields", "shell", "where")

    def __init__(
        self,
        argv: tuple[Template, ...],
        env: tuple[tuple[str, Template], ...],
        shell: bool,
        where: str,
    ) -> None:
        self._argv = argv
        self._env = env
        self._scripts = frozenset() if shell else shell_scripts([t.text for t in argv])
        self.shell = shell
        self.where = where
        fields: set[str] = set()
        for template in argv:
            fields |= template.fields
        for _, template in env:
            fields |= template.fields
        self.fields: frozenset[str] = frozenset(fields)

    @classmethod
    def compile(
        cls, argv: Sequence[str], env: Mapping[str, str], *, shell: bool = False, where: str
    ) -> CommandTemplate:
        """Compile every argv element and env value; errors name the element."""
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not a string")
        if not argv:
            raise TemplateError(f"{where}: empty command")
        if shell and len(argv) != 1:
            raise TemplateError(
                f"{where}: with shell = true the command must be one string, got {len(argv)} "
                "elements"
            )
        compiled_argv = tuple(
            Template.compile(arg, where=f"{where} argv[{i}]") for i, arg in enumerate(argv)
        )
        compiled_env = []
        for key, value in env.items():
            if not key or "=" in key or "\0" in key:
                raise TemplateError(f"{where}: invalid environment variable name {key!r}")
            compiled_env.append((key, Template.compile(value, where=f"{where} env {key}")))
        return cls(compiled_argv, tuple(compiled_env), shell, where)

    def render_argv(self, values: Mapping[str, str]) -> list[str]:
        """Render argv for exec; see the class docstring for the shell form."""
        if self.shell:
            quoted = {name: shlex.quote(values[name]) for name in self.fields if name in values}
            script = self._argv[0].render(quoted)
            _check_nul(script, f"{self.where}: argv[0]")
            return ["/bin/sh", "-c", script]
        out = [template.render(values) for template in self._argv]
        for i in self._scripts:
            # A field inside an explicit `sh -c SCRIPT` is still code for a shell: quote it.
            out[i] = self._argv[i].render({k: shlex.quote(v) for k, v in values.items()})
        for i, arg in enumerate(out):
            if "\0" in arg:
                _check_nul(arg, f"{self.where}: argv[{i}]")
        return out

    def render_env(self, values: Mapping[str, str]) -> dict[str, str]:
        """Render the env values (never shell-quoted: they do not pass through a shell)."""
        out: dict[str, str] = {}
        for key, template in self._env:
            value = template.render(values)
            _check_nul(value, f"{self.where}: env {key}")
            out[key] = value
        return out


#: Programs whose ``-c SCRIPT`` argument is shell code.
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})


def compile_command(task: TaskConfig) -> CommandTemplate:
    """The task's command (or, for a callable, the Python runner) as a template."""
    if task.call is not None:
        argv: tuple[str, ...] = (sys.executable, "-m", "shards.runner", task.call)
        return CommandTemplate.compile(argv, dict(task.env), where="call")
    return CommandTemplate.compile(task.command, dict(task.env), shell=task.shell, where="command")


def shell_scripts(argv: Sequence[str]) -> frozenset[int]:
    """Indexes of argv elements that are a shell's ``-c`` script (``sh -c``, ``bash -ec``).

    Values substituted there are shell-quoted, so ``sh -c 'echo {name}'``
    with a name like ``x; rm -rf ~`` prints it instead of running it.
    """
    found: set[int] = set()
    for i, arg in enumerate(argv):
        if os.path.basename(arg) not in SHELLS:
            continue
        j = i + 1
        while j < len(argv) and argv[j].startswith("-") and argv[j] != "--":
            flag = argv[j]
            if not flag.startswith("--") and "c" in flag[1:]:
                if j + 1 < len(argv):
                    found.add(j + 1)
                break
            j += 1
    return frozenset(found)


def _check_nul(text: str, what: str) -> None:
    if "\0" in text:
        raise TemplateError(f"{what} contains a NUL byte after substitution; {_NUL_HINT}")


def _stringify(value: Any) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def shard_values(
    shard: Shard,
    count: int,
    checkpoint: str = "",
    *,
    fields: Iterable[str] = (),
    checkpoint_value: Any = None,
) -> dict[str, str]:
    """The substitution values of one shard: its record's fields as strings (JSON for
    non-strings, "" for null) overlaid by the built-ins index, count, id, checkpoint.

    Dotted names among ``fields`` (``checkpoint.page``, ``address.city``) reach into
    the JSON value of their first part -- the record field, or the checkpoint object
    (``checkpoint_value``) -- by key, or by index in a list; a part that is not
    there renders as empty, like null (a first attempt has no checkpoint yet).
    """
    values = {key: _stringify(value) for key, value in shard.record.items()}
    values["index"] = str(shard.index)
    values["count"] = str(count)
    values["id"] = shard.id
    values["checkpoint"] = checkpoint
    for name in fields:
        if "." not in name:
            continue
        head, *path = name.split(".")
        value: Any = checkpoint_value if head == "checkpoint" else shard.record.get(head)
        for key in path:
            if isinstance(value, Mapping):
                value = value.get(key)
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                value = None
                break
        values[name] = _stringify(value)
    return values


def check_fields(template: CommandTemplate, shards: ShardList) -> None:
    """Fail before anything starts if the template uses a field some record lacks.

    Cheap for large lists: ``shards.fields`` already holds the fields every record
    has, so records are scanned only when a field is missing, to name the line.
    """
    roots = {name.split(".", 1)[0] for name in template.fields}
    missing = sorted(roots - BUILTIN_FIELDS - shards.fields)
    if not missing:
        return
    field = missing[0]
    if shards.format == "csv":
        columns = list(shards[0].record) if len(shards) else sorted(shards.fields)
        raise TemplateError(
            f"{shards.source}: no column {field!r} used by the command "
            f"(columns: {', '.join(columns)}){_did_you_mean(field, columns)}"
        )
    if shards.format == "jsonl":
        for shard in shards:
            if field not in shard.record:
                keys = list(shard.record)
                raise TemplateError(
                    f"{shards.source}:{shard.line}: record has no field {field!r} used by the "
                    f"command (fields: {', '.join(keys)})"
                    f"{_did_you_mean(field, [*keys, *_BUILTIN_ORDER])}"
                )
    known = [*sorted(shards.fields), *_BUILTIN_ORDER]
    raise TemplateError(
        f"{shards.source}: no field {field!r} used by the command "
        f"(fields: {', '.join(known)}){_did_you_mean(field, known)}"
    )


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = closest(word, candidates)
    return f"; did you mean {close!r}?" if close else ""
