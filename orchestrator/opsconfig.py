"""The operating parts of orch.toml: notification channels, schedules, ``[gc]``.

``load_config`` calls ``check_ops`` on every read of orch.toml, so a bad
channel, cron expression or duration is exit 2 with one line whatever
command read the file. ``ops_config`` gives the parsed, frozen objects to
whoever needs them (the run starter for notify, ``orch serve`` for schedules
and gc).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError, OrchError
from orchestrator.notifyconfig import NotifyConfig, parse_notify
from orchestrator.schedule import ScheduleSpec, parse_schedules
from orchestrator.units import parse_duration

if TYPE_CHECKING:
    from orchestrator.configfile import ConfigFile

__all__ = ["GcConfig", "OpsConfig", "check_ops", "ops_config", "parse_gc"]


@dataclass(frozen=True, slots=True)
class GcConfig:
    """``[gc]``: what ``orch serve`` prunes daily (nothing when the table is absent)."""

    keep_runs: int | None = None
    older_than_s: float | None = None


def parse_gc(tables: Mapping[str, Any], *, where: str) -> GcConfig | None:
    """The ``[gc]`` table, or None when there is none; one-line ConfigErrors."""
    if "gc" not in tables:
        return None
    table = tables["gc"]
    here = f"{where}: [gc]"
    if not isinstance(table, dict):
        raise ConfigError(f"{here} must be a table")
    for key in table:
        if key not in ("keep_runs", "older_than"):
            raise ConfigError(f"{here}: unknown key {key!r} (keys: keep_runs, older_than)")
    keep = table.get("keep_runs")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise ConfigError(f"{here} keep_runs: expected an integer >= 0, got {keep!r}")
    older: float | None = None
    if "older_than" in table:
        try:
            older = parse_duration(table["older_than"], where=f"{here} older_than")
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
    if keep is None and older is None:
        raise ConfigError(f"{here}: set keep_runs, older_than or both")
    return GcConfig(keep_runs=keep, older_than_s=older)


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """Notify channels and task lists, schedules by task, and ``[gc]`` (None when absent)."""

    notify: NotifyConfig
    schedules: Mapping[str, ScheduleSpec] = field(default_factory=dict)
    gc: GcConfig | None = None


def check_ops(
    tables: Mapping[str, Any], extras: Mapping[str, Mapping[str, Any]], where: str
) -> OpsConfig:
    """Parse and validate; raises a one-line ``ConfigError`` naming the file, table and key."""
    return OpsConfig(
        notify=parse_notify(tables, extras, where=where),
        schedules=parse_schedules(extras, where=where),
        gc=parse_gc(tables, where=where),
    )


def ops_config(cfg: ConfigFile) -> OpsConfig:
    """The operating config of a loaded orch.toml (validated when ``load_config`` read it)."""
    if cfg.ops is not None:
        return cfg.ops
    return check_ops(cfg.tables, cfg.extras, cfg.path)
