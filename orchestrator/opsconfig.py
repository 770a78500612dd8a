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

if TYPE_CHECKING:
    from orchestrator.configfile import ConfigFile
    from orchestrator.notify.config import NotifyConfig
    from orchestrator.prune import GcConfig
    from orchestrator.schedule import ScheduleSpec

__all__ = ["OpsConfig", "check_ops", "ops_config"]


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
    from orchestrator.notify.config import parse_notify
    from orchestrator.prune import parse_gc
    from orchestrator.schedule import parse_schedules

    return OpsConfig(
        notify=parse_notify(tables, extras, where=where),
        schedules=parse_schedules(extras, where=where),
        gc=parse_gc(tables, where=where),
    )


def ops_config(cfg: ConfigFile) -> OpsConfig:
    """The operating config of a loaded orch.toml (already validated by ``load_config``)."""
    from orchestrator.configfile import _display

    return check_ops(cfg.tables, cfg.extras, _display(cfg.path))
