"""supervisord.conf -> orch tasks: every ``[program:x]``, the rest as comments."""

from __future__ import annotations

import configparser
import os
import re
import shlex
from collections.abc import Mapping

from orchestrator.errors import ConfigError
from orchestrator.migrate.toml_out import Task, render, toml_value
from orchestrator.migrate.util import braces, duration, task_name

__all__ = ["convert", "looks_like_supervisor", "parse"]

#: supervisor's default signal is TERM, which is what orch sends.
_SIGNALS = {"TERM", "SIGTERM", "15"}
_EXPANSION = re.compile(r"%\((\w+)\)([-#0 +]*\d*(?:\.\d+)?[sdif])")
#: Keys that describe supervisor's own logging/process management: one shared note each.
_UNMAPPED = {
    "process_name": "orch names each process by its shard index/id",
    "priority": "orch starts a task's shards in shard order; tasks are independent",
    "user": "orch runs shards as the user who runs orch",
    "umask": "set it in the command (sh -c 'umask 022; exec ...') if needed",
    "redirect_stderr": "orch always keeps stdout and stderr apart, per shard",
    "stdout_logfile": "orch writes each shard's stdout to <run>/logs/<index>-<id>.out",
    "stderr_logfile": "orch writes each shard's stderr to <run>/logs/<index>-<id>.err",
    "stderr_logfile_maxbytes": "orch uses one log_max_size for both streams",
    "stderr_logfile_backups": "orch uses one log_backups for both streams",
    "stdout_capture_maxbytes": "no capture mode in orch",
    "stderr_capture_maxbytes": "no capture mode in orch",
    "stdout_events_enabled": "orch has no event listeners; see [notify.NAME] channels",
    "stderr_events_enabled": "orch has no event listeners; see [notify.NAME] channels",
    "stdout_syslog": "orch does not write to syslog",
    "stderr_syslog": "orch does not write to syslog",
    "serverurl": "orch steers runs over their own control socket",
    "stopasgroup": "orch always signals the whole process group",
    "killasgroup": "orch always signals the whole process group",
}


def parse(text: str, where: str) -> configparser.RawConfigParser:
    """supervisor's INI dialect: ';' or '#' comments, inline ' ;' comments, no interpolation."""
    parser = configparser.RawConfigParser(
        inline_comment_prefixes=(";", "#"), strict=False, interpolation=None
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not a valid supervisord.conf ({first})") from None
    return parser


def looks_like_supervisor(parser: configparser.RawConfigParser) -> bool:
    return any(s.startswith("program:") or s == "supervisord" for s in parser.sections())


def convert(parser: configparser.RawConfigParser, source: str, environ: Mapping[str, str]) -> str:
    here = os.path.dirname(os.path.abspath(source))
    tasks: list[Task] = []
    notes: list[str] = []
    names: set[str] = set()
    for section in parser.sections():
        if section.startswith("program:"):
            program = section.split(":", 1)[1]
            task = _program(program, dict(parser.items(section)), here, environ, names)
            tasks.append(task)
        elif section.startswith(("group:", "eventlistener:", "fcgi-program:")):
            notes.append(f"[{section}] not imported: orch has no {section.split(':')[0]}s")
        elif section == "include":
            files = parser.get(section, "files", fallback="")
            notes.append(f"[include] files = {files}: not followed; import those files too")
    if not tasks:
        notes.append("no [program:x] section: nothing to import")
    return render(os.path.basename(source), "supervisord.conf", tasks, notes)


def _program(
    program: str, opts: dict[str, str], here: str, environ: Mapping[str, str], names: set[str]
) -> Task:
    task = Task(task_name(program, names))
    if task.name != program:
        task.note(f"program {program!r} is named {task.name!r}: orch task names are simpler")
    numprocs = _int(opts.pop("numprocs", "1"), "numprocs", program)
    start = _int(opts.pop("numprocs_start", "0"), "numprocs_start", program)
    expanded: list[str] = []

    def expand(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            name, spec = match.group(1), match.group(2)
            if name == "process_num":
                if spec not in ("d", "s", "i"):
                    task.note(
                        f"%(process_num){spec}: the format is lost, orch writes the plain number"
                    )
                return "{value}" if start else "{index}"
            if name == "program_name":
                return program
            if name == "group_name":
                return program
            if name == "here":
                return here
            if name == "host_node_name":
                return os.uname().nodename
            if name.startswith("ENV_") and name[4:] in environ:
                expanded.append(name)
                return braces(environ[name[4:]])
            task.note(f"%({name}){spec} has no orch equivalent; left as written")
            return match.group(0)

        return _EXPANSION.sub(one, braces(value))

    command = opts.pop("command", None)
    if command is None:
        task.note("no command: supervisor would refuse this program too")
        task.keys["command"] = "true"
    else:
        task.keys["command"] = expand(command)
    if start:
        task.keys["range"] = f"{start}..{start + numprocs - 1}"
    else:
        task.keys["split"] = numprocs
    autorestart = opts.pop("autorestart", "unexpected").strip().lower()
    exitcodes = opts.pop("exitcodes", "0").replace(" ", "")
    if autorestart in ("true", "yes", "1", "on"):
        task.keys["restart"] = "always"
    elif autorestart in ("false", "no", "0", "off"):
        task.keys["restart"] = "never"
    else:
        task.keys["restart"] = "on-failure"
        if exitcodes != "0":
            task.note(
                f"exitcodes = {exitcodes}: orch treats exit 0 as done and any other exit as a"
                " failure to restart"
            )
    if "startretries" in opts:
        task.keys["max_restarts"] = _int(opts.pop("startretries"), "startretries", program)
    if "startsecs" in opts:
        secs = _int(opts.pop("startsecs"), "startsecs", program)
        if secs > 0:
            task.keys["backoff_reset"] = duration(secs)
        else:
            task.note("startsecs = 0: orch needs a healthy stretch > 0; backoff_reset stays 60s")
    if "stopwaitsecs" in opts:
        task.keys["stop_timeout"] = duration(
            _int(opts.pop("stopwaitsecs"), "stopwaitsecs", program)
        )
    signal = opts.pop("stopsignal", "TERM").strip().upper()
    if signal not in _SIGNALS:
        task.note(
            f"stopsignal = {signal}: orch stops with SIGTERM, then SIGKILL after stop_timeout"
        )
    if "directory" in opts:
        task.keys["cwd"] = expand(opts.pop("directory"))
    if "stdout_logfile_maxbytes" in opts:
        size = opts.pop("stdout_logfile_maxbytes").strip()
        if size not in ("0", "0B", "0MB"):
            task.keys["log_max_size"] = size
    if "stdout_logfile_backups" in opts:
        task.keys["log_backups"] = _int(
            opts.pop("stdout_logfile_backups"), "stdout_logfile_backups", program
        )
    # supervisord starts every program it loads unless told not to; orch's match is a
    # service that `orch serve` starts when it starts (docs/config.md, autostart).
    autostart = opts.pop("autostart", "true").strip().lower()
    if autostart in ("true", "yes", "1", "on"):
        task.keys["autostart"] = True
    environment = opts.pop("environment", None)
    if environment:
        for key, value in _environment(environment, program).items():
            task.env[key] = expand(value)
    for key, value in opts.items():
        why = _UNMAPPED.get(key)
        if why is None:
            task.note(f"{key} = {value}: no orch equivalent")
        elif key.endswith("logfile") and value.strip().upper() in ("NONE", "AUTO", ""):
            continue
        else:
            task.note(f"{key} = {value}: {why}")
    if expanded:
        task.note(
            f"{', '.join(sorted(set(expanded)))}: expanded at import time from this shell's"
            " environment"
        )
    return task


def _int(value: str, key: str, program: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(
            f"[program:{program}] {key}: expected an integer, got {toml_value(value)}"
        ) from None


def _environment(text: str, program: str) -> dict[str, str]:
    """supervisor's ``KEY="value",KEY2=value2`` (quotes protect commas)."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace = ","
    lexer.whitespace_split = True
    out: dict[str, str] = {}
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise ConfigError(f"[program:{program}] environment: {exc}") from None
    for token in tokens:
        key, sep, value = token.strip().partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"[program:{program}] environment: expected KEY=value, got {token!r}")
        out[key.strip()] = value
    return out
