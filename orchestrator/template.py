"""Command templates: `{field}` substitution into argv elements and env values.

The promise (DESIGN.md #9) is that a shard's values never pass through a
shell: each argv element is rendered on its own and handed to exec as one
element, so a record value like ``x; rm -rf ~`` arrives byte for byte as one
argument. Only when the user asks for ``shell = true`` is a shell involved, and
then every substituted value is ``shlex.quote``d first.

Syntax, deliberately smaller than ``str.format``: ``{name}`` substitutes the
field named exactly ``name`` (any non-empty text without braces, so CSV headers
with spaces or dashes work), ``{{`` and ``}}`` are literal braces, and there
are no format specs or conversions. Templates are compiled once per run and
rendered per attempt by filling precomputed slots and joining.
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator.errors import TemplateError

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
        """Compile ``text``; raise ``TemplateError`` naming ``where`` and the 1-based
        character position of an unbalanced brace or an empty ``{}``."""
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
                end = text.find("}", i + 1)
                nested = text.find("{", i + 1, end if end != -1 else n)
                if end == -1 or nested != -1:
                    raise TemplateError(f"{where}: unbalanced '{{' at character {i + 1} {_hint()}")
                if end == i + 1:
                    raise TemplateError(
                        f"{where}: empty '{{}}' at character {i + 1} (name a field, e.g. {{id}})"
                    )
                parts.append("".join(literal))
                literal = []
                slots.append((len(parts), text[i + 1 : end]))
                parts.append("")
                i = end + 1
            elif ch == "}":
                if not text.startswith("}}", i):
                    raise TemplateError(f"{where}: unbalanced '}}' at character {i + 1} {_hint()}")
                literal.append("}")
                i += 2
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


def _hint() -> str:
    return "(write '{{' or '}}' for a literal brace)"


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


def shard_values(shard: Shard, count: int, checkpoint: str = "") -> dict[str, str]:
    """The substitution values of one shard: its record's fields as strings (JSON for
    non-strings, "" for null) overlaid by the built-ins index, count, id, checkpoint."""
    values = {key: _stringify(value) for key, value in shard.record.items()}
    values["index"] = str(shard.index)
    values["count"] = str(count)
    values["id"] = shard.id
    values["checkpoint"] = checkpoint
    return values


def check_fields(template: CommandTemplate, shards: ShardList) -> None:
    """Fail before anything starts if the template uses a field some record lacks.

    Cheap for large lists: ``shards.fields`` already holds the fields every record
    has, so records are scanned only when a field is missing, to name the line.
    """
    missing = sorted(template.fields - BUILTIN_FIELDS - shards.fields)
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
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
