"""orch.toml and the one immutable ``TaskConfig`` built from it and the CLI.

The config is built once, at the CLI edge (STYLE.md #10): ``build_task``
layers the command-line overrides over the file's ``[tasks.NAME]`` table over
the defaults in one visible ``ChainMap``, converts every value (durations,
sizes, paths) and validates it, and hands back a frozen ``TaskConfig``. Every
mistake is a ``ConfigError`` of one line naming the file, task and key, or the
command-line flag the value came from; nothing is started on a bad config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.configfile import (
    CONFIG_NAME,
    NAME_RE,
    ConfigFile,
    did_you_mean,
    display,
    find_config,
    kind_of,
    load_config,
)
from orchestrator.errors import ConfigError, OrchError
from orchestrator.settings import BY_KEY, KEYS, Kind, Restart, Zero, default
from orchestrator.sources import parse_range
from orchestrator.units import format_duration, parse_duration, parse_size, parse_timeout

__all__ = ["ConfigFile", "Restart", "TaskConfig", "build_task", "find_config", "load_config"]


class FrozenEnv(Mapping[str, str]):
    """An immutable, hashable (and picklable) str->str mapping, so TaskConfig is hashable."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._data = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenEnv({self._data!r})"


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """Everything a run needs to know about its task; units are in the names.

    Each field's default comes from its declaration in ``settings.SETTINGS``.
    """

    name: str = "run"
    command: tuple[str, ...] = default("command")
    call: str | None = default("call")
    shell: bool = default("shell")
    shards: str | None = default("shards")
    format: str | None = default("format")
    split: int | None = default("split")
    range: str | None = default("range")
    env: Mapping[str, str] = field(default_factory=FrozenEnv)
    cwd: str | None = default("cwd")
    jobs: int | None = default("jobs")
    restart: Restart = default("restart")
    max_restarts: int = default("max_restarts")
    backoff_initial_s: float = default("backoff_initial_s")
    backoff_max_s: float = default("backoff_max_s")
    backoff_factor: float = default("backoff_factor")
    backoff_jitter: float = default("backoff_jitter")
    backoff_reset_s: float = default("backoff_reset_s")
    stop_timeout_s: float = default("stop_timeout_s")
    heartbeat_interval_s: float = default("heartbeat_interval_s")
    #: None: no heartbeat timeout at all ("none").
    heartbeat_timeout_s: float | None = default("heartbeat_timeout_s")
    #: Whether the user set heartbeat_timeout: only then does it apply to shards that
    #: never spoke the ZeroMQ protocol (stdout protocol, plain commands).
    heartbeat_timeout_set: bool = False
    stall_timeout_s: float | None = default("stall_timeout_s")
    require_heartbeat: bool = default("require_heartbeat")
    max_memory_bytes: int | None = default("max_memory_bytes")
    log_max_bytes: int = default("log_max_bytes")
    log_backups: int = default("log_backups")
    backend: str = default("backend")
    ray_address: str | None = default("ray_address")
    #: Custom Ray resources each attempt needs, as sorted (name, amount) pairs.
    resources: tuple[tuple[str, float], ...] = default("resources")
    shard_cpus: float = default("shard_cpus")
    shard_memory_bytes: int | None = default("shard_memory_bytes")
    final_exit_codes: tuple[int, ...] = default("final_exit_codes")
    max_failed: int | None = default("max_failed")
    concurrency: int = default("concurrency")
    autostart: bool = default("autostart")

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "final_exit_codes", tuple(self.final_exit_codes))
        if isinstance(self.resources, Mapping):
            pairs = self.resources.items()
        else:
            pairs = (tuple(pair) for pair in self.resources)  # type: ignore[assignment]
        object.__setattr__(self, "resources", tuple(sorted((str(k), float(v)) for k, v in pairs)))
        if not isinstance(self.env, FrozenEnv):
            object.__setattr__(self, "env", FrozenEnv(self.env))
        object.__setattr__(self, "restart", Restart(self.restart))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the run snapshot); ``from_json`` gives back an equal config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["command"] = list(self.command)
        out["final_exit_codes"] = list(self.final_exit_codes)
        out["env"] = dict(self.env)
        out["restart"] = str(self.restart)
        out["resources"] = dict(self.resources)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TaskConfig:
        """Rebuild from ``to_json`` output; missing keys take defaults, unknown keys fail."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"task snapshot: unknown key {unknown[0]!r}")
        values = dict(d)
        for name in _FLOAT_FIELDS & set(values):
            if isinstance(values[name], int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task snapshot: {exc}") from None


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(TaskConfig) if "float" in str(f.type)}

#: ``package.module:function``: dotted names on both sides, no empty part (``a.:b`` is not one).
CALLABLE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value came from: the text to name it by, and the base for relative paths."""

    where: str
    base: str


def build_task(
    *,
    name: str,
    file_task: Mapping[str, Any] | None,
    file_path: str | None,
    overrides: Mapping[str, Any],
    cwd: str,
) -> TaskConfig:
    """Merge CLI ``overrides`` > ``file_task`` > defaults, convert and validate.

    Two groups are taken whole from the highest layer that sets any of their
    keys, so ``--split 4`` replaces the file's ``shards`` rather than clashing
    with it: what to run (command/call; shell follows unless given on the CLI)
    and the shard list (shards/split/range). ``env`` tables are merged, CLI
    entries winning. Raises ``ConfigError`` naming the flag or file/task/key.
    """
    cli = {key: value for key, value in overrides.items() if value is not None}
    for key in cli:
        if key not in KEYS:
            raise ValueError(f"build_task: unknown override {key!r}")
    file = dict(file_task or {})
    shown = display(file_path) if file_path else CONFIG_NAME
    for key in file:
        if key not in KEYS:
            raise ConfigError(
                f"{shown}: unknown key {key!r} in [tasks.{name}]"
                f"{did_you_mean(key, list(KEYS), sep=' (', end=')')}"
            )
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"task name {name!r}: use letters, digits, '_', '-', '.'")
    file_base = os.path.dirname(os.path.abspath(file_path)) if file_path else cwd
    origins = (
        (cli, lambda key: _Origin(_flag(key), cwd)),
        (file, lambda key: _Origin(f"{shown}: [tasks.{name}] {key}", file_base)),
    )
    # The precedence, in one place: CLI > file > defaults (defaults = TaskConfig()).
    layers = ChainMap(cli, file)

    def origin(key: str) -> _Origin:
        return next(make(key) for layer, make in origins if key in layer)

    values: dict[str, Any] = {"name": name, "heartbeat_timeout_set": "heartbeat_timeout" in layers}
    grouped = ("command", "call", "shell", "shards", "split", "range", "env")
    for key, field_name in KEYS.items():
        if key in layers and key not in grouped:
            values[field_name] = _convert(key, layers[key], origin(key))

    run_layer = _top_layer(layers, ("command", "call"))
    if run_layer is None:
        raise ConfigError("no command: give one after -- or set command/call in orch.toml")
    if "command" in run_layer and "call" in run_layer:
        raise ConfigError(f"{origin('call').where}: give either command or call, not both")
    shell_layer = cli if "shell" in cli else run_layer
    if "shell" in shell_layer:
        values["shell"] = _convert("shell", shell_layer["shell"], origin("shell"))
    if "call" in run_layer:
        values["call"] = _convert("call", run_layer["call"], origin("call"))
        if values.get("shell"):
            raise ConfigError(f"{origin('shell').where}: shell = true needs a command, not call")
    else:
        values["command"] = _command(
            run_layer["command"], origin("command"), values.get("shell", False)
        )

    shard_layer = _top_layer(layers, ("shards", "split", "range"))
    if shard_layer is None:
        raise ConfigError("no shard list: give --shards FILE, --split N or --range A..B")
    given = [key for key in ("shards", "split", "range") if key in shard_layer]
    if len(given) > 1:
        raise ConfigError(
            f"{origin(given[1]).where}: give only one of shards, split, range "
            f"(got {' and '.join(given)})"
        )
    values[given[0]] = _convert(given[0], shard_layer[given[0]], origin(given[0]))

    env: dict[str, str] = {}
    for layer, make in reversed(origins):
        if "env" in layer:
            env.update(_env(layer["env"], make("env")))
    values["env"] = env
    config = TaskConfig(**values)
    _check_relations(config, origin, layers)
    return config


def _top_layer(layers: ChainMap[str, Any], keys: tuple[str, ...]) -> Mapping[str, Any] | None:
    return next((layer for layer in layers.maps if any(k in layer for k in keys)), None)


def _flag(key: str) -> str:
    return "the command after --" if key == "command" else "--" + key.replace("_", "-")


def _check_relations(
    config: TaskConfig, origin: Callable[[str], _Origin], layers: ChainMap[str, Any]
) -> None:
    """Constraints between keys; the error names a key the user actually set."""

    def name(*keys: str) -> str:
        return next(origin(k).where for k in keys if k in layers)

    if config.backoff_initial_s > config.backoff_max_s:
        raise ConfigError(
            f"{name('backoff_initial', 'backoff_max')}: backoff_initial "
            f"({format_duration(config.backoff_initial_s)}) is larger than backoff_max "
            f"({format_duration(config.backoff_max_s)})"
        )
    if (
        config.heartbeat_timeout_s is not None
        and config.heartbeat_timeout_s <= config.heartbeat_interval_s
    ):
        raise ConfigError(
            f"{name('heartbeat_timeout', 'heartbeat_interval')}: heartbeat_timeout "
            f"({format_duration(config.heartbeat_timeout_s)}) must be longer than "
            f"heartbeat_interval ({format_duration(config.heartbeat_interval_s)})"
        )


# ----------------------------------------------------------------------------- converters

#: Largest integer setting: what the run database (SQLite) can store.
_MAX_INT = 2**63 - 1


def _convert(key: str, value: Any, origin: _Origin) -> Any:
    """Check the type of one orch.toml/CLI value and convert it to its TaskConfig form."""
    where = origin.where
    setting = BY_KEY[key]
    kind = setting.kind
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise _expected(origin, "true or false", value)
        return value
    if kind is Kind.INT:
        least = int(setting.minimum or 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(origin, f"an integer >= {least}", value)
        if value < least:
            raise ConfigError(f"{where}: must be at least {least}, got {value}")
        if value > _MAX_INT:
            raise ConfigError(f"{where}: must be at most {_MAX_INT}, got {value}")
        return value
    if kind is Kind.NUMBER:
        low, high = setting.minimum or 0.0, setting.maximum
        what = f"a number from {low:g} to {high:g}" if high is not None else f"a number >= {low:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected(origin, what, value)
        if not low <= value <= (high if high is not None else float("inf")):
            raise ConfigError(f"{where}: must be {what}, got {value!r}")
        return float(value)
    if setting.zero is Zero.NONE:
        try:
            seconds = parse_timeout(value, where=where)
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
        if seconds is not None and seconds > _MAX_INT:
            raise ConfigError(f"{where}: {value!r} is too large")
        return seconds
    if kind is Kind.DURATION or kind is Kind.SIZE:
        try:
            amount = (parse_duration if kind is Kind.DURATION else parse_size)(value, where=where)
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
        if amount > _MAX_INT:
            raise ConfigError(f"{where}: {value!r} is too large")
        if amount == 0 and setting.zero is Zero.OFF:
            return None
        if amount == 0 and setting.zero is Zero.INVALID:
            raise ConfigError(f"{where}: must be more than 0, got {value!r}")
        return amount
    if kind is Kind.CHOICE:
        choices = setting.choices
        if not isinstance(value, str):
            raise _expected(origin, "one of " + ", ".join(choices), value)
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(choices)}"
                f"{did_you_mean(value, list(choices), sep='; ')}"
            )
        return value
    if kind is Kind.RESOURCES:
        return _resources(value, origin)
    if kind is Kind.TEXT:
        if not isinstance(value, str) or not value.strip():
            raise _expected(origin, "HOST:PORT or 'auto'", value)
        return value.strip()
    if kind is Kind.CODES:
        return _codes(value, origin)
    if kind is Kind.RANGE:
        try:
            first, last = parse_range(value, where=where)
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
        return f"{first}..{last}"
    if not isinstance(value, str) or not value.strip():
        raise _expected(origin, "a non-empty string", value)
    if kind is Kind.CALL:
        if not CALLABLE.fullmatch(value.strip()):
            raise _expected(origin, "'package.module:function'", value)
        return value.strip()
    path = os.path.normpath(os.path.join(origin.base, os.path.expanduser(value)))
    if key == "cwd" and not os.path.isdir(path):
        raise ConfigError(f"{where}: no such directory {path!r}")
    return path


def _codes(value: object, origin: _Origin) -> tuple[int, ...]:
    """Exit statuses 1..255, from an array or from "4,44" (the command line)."""
    what = "exit codes from 1 to 255 (an array, or 4,44 on the command line)"
    items: list[object]
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            part = part.strip()
            if not part.isdigit():
                raise ConfigError(f"{origin.where}: expected {what}, got {value!r}")
            items.append(int(part))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _expected(origin, what, value)
    codes: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 255:
            raise ConfigError(f"{origin.where}: expected {what}, got {item!r}")
        if item not in codes:
            codes.append(item)
    return tuple(codes)


def _expected(origin: _Origin, what: str, value: object) -> ConfigError:
    return ConfigError(f"{origin.where}: expected {what}, got {kind_of(value)}")


def _resources(value: object, origin: _Origin) -> dict[str, float]:
    """A table of custom Ray resource names to amounts (``resources = {nodeA = 1}``)."""
    if not isinstance(value, Mapping):
        raise _expected(origin, "a table of resource names to numbers", value)
    out: dict[str, float] = {}
    for key, amount in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{origin.where}: invalid resource name {key!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
            raise ConfigError(
                f"{origin.where}.{key}: expected a number >= 0, got {kind_of(amount)}"
            )
        out[key] = float(amount)
    return out


def _command(value: object, origin: _Origin, shell: bool) -> tuple[str, ...]:
    """argv from an array, or from a string split like a shell would (kept whole for shell)."""
    if isinstance(value, str):
        try:
            argv = [value] if shell else shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{origin.where}: cannot split the command ({exc})") from None
    elif isinstance(value, list | tuple):
        argv = list(value)
        for i, arg in enumerate(argv):
            if not isinstance(arg, str):
                raise ConfigError(f"{origin.where}[{i}]: expected a string, got {kind_of(arg)}")
    else:
        raise _expected(origin, "an array of strings or a string", value)
    if not argv or not argv[0].strip():
        raise ConfigError(f"{origin.where}: empty command")
    if shell and len(argv) != 1:
        raise ConfigError(
            f"{origin.where}: with shell = true the command must be one string, "
            f"got {len(argv)} elements"
        )
    return tuple(argv)


def _env(value: object, origin: _Origin) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _expected(origin, "a table of strings", value)
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"{origin.where}: invalid environment variable name {key!r}")
        if not isinstance(item, str):
            raise ConfigError(
                f"{origin.where}.{key}: expected a string, got {kind_of(item)} "
                f'(quote it: {key} = "...")'
            )
    return dict(value)
