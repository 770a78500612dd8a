"""One declaration per task setting: key, TaskConfig field, kind, default, ``orch run`` flag.

Everything else is derived from ``SETTINGS``: the orch.toml keys and their
TaskConfig fields (``configfile.KEYS``), how ``config.build_task`` checks
and converts each value, which ``orch run`` option sets which key
(``cli_overrides``), and the defaults of ``TaskConfig`` and of the
lifecycle's ``Policy`` (``default``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Restart(enum.StrEnum):
    """When a shard whose process ended is started again."""

    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NEVER = "never"


class Kind(enum.Enum):
    """How a value is written in orch.toml and on the command line."""

    COMMAND = "command"  # an argv array, or a string split like a shell would
    CALL = "call"  # package.module:function
    ENV = "env"  # a table of strings
    BOOL = "bool"
    INT = "int"
    NUMBER = "number"
    DURATION = "duration"  # "1m30s", or seconds; the field gets "_s"
    SIZE = "size"  # "512MiB", or bytes; the field gets "_bytes"
    CHOICE = "choice"
    RANGE = "range"  # A..B
    PATH = "path"  # relative to orch.toml (or to the working directory for flags)
    TEXT = "text"  # a non-empty string, kept as written (an address)
    RESOURCES = "resources"  # a table of names to numbers >= 0 (Ray custom resources)
    CODES = "codes"  # exit statuses 1..255: an array, or "4,44" on the command line


class Zero(enum.Enum):
    """What 0 means for a duration or size."""

    ALLOWED = "allowed"
    OFF = "off"  # 0 switches the check off (stored as None)
    INVALID = "invalid"  # must be more than 0
    #: A timeout: "none" switches the check off (None), 0 is refused with a hint to say so.
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    kind: Kind
    default: Any = None
    #: The ``orch run`` option's click parameter name, when the setting has a flag.
    option: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    zero: Zero = Zero.ALLOWED
    #: The TaskConfig field, when not the key plus the kind's unit suffix.
    field_name: str | None = None

    @property
    def field(self) -> str:
        if self.field_name is not None:
            return self.field_name
        return self.key + {Kind.DURATION: "_s", Kind.SIZE: "_bytes"}.get(self.kind, "")


MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("command", Kind.COMMAND, ()),
    Setting("call", Kind.CALL),
    Setting("shell", Kind.BOOL, False, option="shell"),
    Setting("shards", Kind.PATH, option="shards_path"),
    Setting("format", Kind.CHOICE, option="fmt", choices=("csv", "tsv", "jsonl", "text")),
    Setting("split", Kind.INT, option="split", minimum=1),
    Setting("range", Kind.RANGE, option="range_"),
    Setting("env", Kind.ENV),
    Setting("cwd", Kind.PATH, option="cwd"),
    Setting("jobs", Kind.INT, option="jobs", minimum=1),
    Setting(
        "restart",
        Kind.CHOICE,
        Restart.ON_FAILURE,
        option="restart",
        choices=tuple(r.value for r in Restart),
    ),
    Setting("max_restarts", Kind.INT, 5, option="max_restarts", minimum=0),
    Setting("backoff_initial", Kind.DURATION, 1.0, option="backoff_initial"),
    Setting("backoff_max", Kind.DURATION, 60.0, option="backoff_max"),
    Setting("backoff_reset", Kind.DURATION, 60.0, option="backoff_reset"),
    Setting("stop_timeout", Kind.DURATION, 10.0, option="stop_timeout"),
    Setting(
        "heartbeat_interval", Kind.DURATION, 1.0, option="heartbeat_interval", zero=Zero.INVALID
    ),
    Setting("heartbeat_timeout", Kind.DURATION, 10.0, option="heartbeat_timeout", zero=Zero.NONE),
    Setting("stall_timeout", Kind.DURATION, None, option="stall_timeout", zero=Zero.NONE),
    Setting("backoff_factor", Kind.NUMBER, 2.0, minimum=1.0),
    Setting("backoff_jitter", Kind.NUMBER, 0.2, minimum=0.0, maximum=1.0),
    Setting("require_heartbeat", Kind.BOOL, False, option="require_heartbeat"),
    Setting("max_memory", Kind.SIZE, None, option="max_memory", zero=Zero.OFF),
    Setting("log_max_size", Kind.SIZE, 10 * MiB, zero=Zero.INVALID, field_name="log_max_bytes"),
    Setting("log_backups", Kind.INT, 3, minimum=0),
    # Where attempts run (docs/scale-out.md).
    Setting("backend", Kind.CHOICE, "local", option="backend", choices=("local", "ray")),
    Setting("ray_address", Kind.TEXT, None, option="ray_address"),
    Setting("resources", Kind.RESOURCES, ()),
    Setting("shard_cpus", Kind.NUMBER, 1.0, option="shard_cpus", minimum=0.0),
    Setting("shard_memory", Kind.SIZE, None, option="shard_memory", zero=Zero.OFF),
    # operating jobs (docs/config.md): failure policy, live runs per task, services
    Setting("final_exit_codes", Kind.CODES, (), option="final_exit_codes"),
    Setting("max_failed", Kind.INT, None, option="max_failed", minimum=0),
    Setting("concurrency", Kind.INT, 1, minimum=1),
    Setting("autostart", Kind.BOOL, False),
)

#: orch.toml key -> its setting.
BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}
#: orch.toml key -> TaskConfig field (durations get "_s", sizes "_bytes").
KEYS: Mapping[str, str] = {s.key: s.field for s in SETTINGS}
_BY_FIELD: Mapping[str, Setting] = {s.field: s for s in SETTINGS}


def default(field: str) -> Any:
    """The default of the TaskConfig (or Policy) field ``field``."""
    return _BY_FIELD[field].default


def cli_overrides(opts: Mapping[str, Any]) -> dict[str, Any]:
    """orch.toml key -> value for every setting that has an ``orch run`` option."""
    return {s.key: opts.get(s.option) for s in SETTINGS if s.option is not None}
