"""Schedules: when a task's runs are due, and what to do about a due fire.

Pure logic, no processes and no clock of its own: ``orch serve`` asks a
``Scheduler`` what to do at ``now`` (wall-clock seconds, since fires are
calendar times) given what it knows of each task (last fire, live run,
queued fire, the previous run's end), carries out the decisions, records
each decision's ``due`` as the task's new last fire, and sleeps until
``wake_at``.

* ``schedule = "*/30 * * * *"``: five-field cron in local time, DST handled
  by cronsim with a real ``zoneinfo`` zone (a time skipped by a spring-forward
  fires at the first instant after the gap; an hour repeated in autumn fires
  a daily job once and an hourly one twice).
* ``every = "30m"`` (any duration, seconds too): due at the last fire plus the
  interval; the first fire is one interval after serve starts.
* A due fire older than ``ON_TIME_S`` was missed (serve was down or busy):
  with ``catch_up = "once"`` (default) the latest missed fire runs once if it
  is within ``starting_deadline`` (default 1 h), else it is skipped; with
  ``"none"`` missed fires are skipped. Several missed fires are one decision
  about the latest of them (found by iterating the cron backwards from now, so
  a long outage costs nothing).
* While a run of the task is live: ``overlap = "skip"`` (default) skips the
  fire, ``"queue"`` records one queued fire that runs when the live run ends
  (several queued fires are one), ``"replace"`` stops the live run and starts
  a new one.
* ``on_incomplete = "resume"``: when the previous run ended stopped or lost,
  the fire resumes it from its checkpoints instead of starting over.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orchestrator.errors import ConfigError, OrchError
from orchestrator.units import parse_duration

__all__ = [
    "Action",
    "CatchUp",
    "Decision",
    "JobFacts",
    "OnIncomplete",
    "Overlap",
    "ScheduleSpec",
    "Scheduler",
    "local_zone",
    "parse_schedules",
]

#: A due fire no older than this is on time; an older one was missed (catch_up applies).
ON_TIME_S = 60.0
DEFAULT_STARTING_DEADLINE_S = 3600.0
SCHEDULE_KEYS = ("schedule", "every", "overlap", "catch_up", "starting_deadline", "on_incomplete")


class Overlap(enum.StrEnum):
    SKIP = "skip"
    QUEUE = "queue"
    REPLACE = "replace"


class CatchUp(enum.StrEnum):
    ONCE = "once"
    NONE = "none"


class OnIncomplete(enum.StrEnum):
    START = "start"
    RESUME = "resume"


class Action(enum.StrEnum):
    """What serve does for a decision; the value is the metric's ``outcome`` label."""

    FIRE = "fired"  # start a new run of the task
    RESUME = "resumed"  # resume ``Decision.run`` (stopped or lost) from its checkpoints
    REPLACE = "replaced"  # stop ``Decision.run`` (live), then start a new run
    QUEUE = "queued"  # remember one fire, to start when the live run ends
    SKIP = "skipped"  # a run is live: nothing starts (logged)
    MISSED = "missed"  # missed while serve was down and not caught up (logged)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A task's schedule: exactly one of ``cron`` / ``every_s``, and its policies."""

    task: str
    cron: str | None = None
    every_s: float | None = None
    overlap: Overlap = Overlap.SKIP
    catch_up: CatchUp = CatchUp.ONCE
    starting_deadline_s: float = DEFAULT_STARTING_DEADLINE_S
    on_incomplete: OnIncomplete = OnIncomplete.START

    def latest_until(self, until: float, tz: tzinfo) -> float:
        """The latest cron fire time at or before ``until`` (cron schedules only)."""
        from cronsim import CronSim

        assert self.cron is not None
        moment = datetime.fromtimestamp(until + 0.001, tz)  # reverse iteration is exclusive
        return next(CronSim(self.cron, moment, reverse=True)).timestamp()

    def next_after(self, after: float, tz: tzinfo) -> float:
        """The first fire time strictly after ``after``."""
        if self.every_s is not None:
            return after + self.every_s
        return next(iter(self._cron_iter(after, tz)))

    def _cron_iter(self, after: float, tz: tzinfo) -> Any:
        from cronsim import CronSim

        assert self.cron is not None
        return (d.timestamp() for d in CronSim(self.cron, datetime.fromtimestamp(after, tz)))


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What serve knows about one scheduled task at a moment."""

    last_fire: float | None = None  # the ``due`` of its last decision (persisted by serve)
    live_run: str | None = None  # a running or pending run of the task
    queued: bool = False  # a QUEUE decision waits for the live run to end
    previous_run: str | None = None  # its newest run, when that is not live
    previous_incomplete: bool = False  # that run ended stopped or lost


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do for one task now: ``due`` becomes its last fire."""

    task: str
    action: Action
    due: float
    next_fire: float
    run: str | None = None
    reason: str = ""


@dataclass
class Scheduler:
    """Decides fires for a set of schedules; ``started_at`` anchors tasks never fired."""

    specs: Sequence[ScheduleSpec]
    tz: tzinfo
    started_at: float
    _by_task: dict[str, ScheduleSpec] = field(init=False)

    def __post_init__(self) -> None:
        self._by_task = {s.task: s for s in self.specs}

    def next_fire(self, task: str, last_fire: float | None) -> float:
        """When ``task`` is next due, given its last fire (``orch schedules``' next column)."""
        spec = self._by_task[task]
        return spec.next_after(self._anchor(spec, last_fire), self.tz)

    def listing(self, facts: Mapping[str, JobFacts]) -> list[dict[str, Any]]:
        """One JSON-ready row per scheduled task, for ``orch schedules`` and the API:
        ``task``, ``schedule`` (the cron text or ``every Ns``), ``last_fire`` and
        ``next_fire`` (Unix seconds; ``last_fire`` null when it never fired), ``overlap``."""
        rows = []
        for spec in self.specs:
            last = facts.get(spec.task, JobFacts()).last_fire
            rows.append(
                {
                    "task": spec.task,
                    "schedule": spec.cron if spec.cron is not None else f"every {spec.every_s:g}s",
                    "last_fire": last,
                    "next_fire": self.next_fire(spec.task, last),
                    "overlap": str(spec.overlap),
                }
            )
        return rows

    def _anchor(self, spec: ScheduleSpec, last_fire: float | None) -> float:
        return self.started_at if last_fire is None else last_fire

    def decide(self, now: float, facts: Mapping[str, JobFacts]) -> list[Decision]:
        """The decisions due at ``now``; tasks with nothing to do are left out."""
        out = []
        for spec in self.specs:
            decision = self._decide(spec, now, facts.get(spec.task, JobFacts()))
            if decision is not None:
                out.append(decision)
        return out

    def wake_at(self, now: float, facts: Mapping[str, JobFacts]) -> float | None:
        """The earliest next fire of any task (serve sleeps until then, or an event)."""
        times = [
            self.next_fire(s.task, facts.get(s.task, JobFacts()).last_fire) for s in self.specs
        ]
        return min(times, default=None)

    def _decide(self, spec: ScheduleSpec, now: float, job: JobFacts) -> Decision | None:
        anchor = self._anchor(spec, job.last_fire)
        latest = self._latest_due(spec, anchor, now)
        if latest is None:
            if job.queued and job.live_run is None:
                return self._fire(spec, job, now, "queued fire: the live run ended")
            return None
        if now - latest > ON_TIME_S:
            if spec.catch_up is CatchUp.NONE:
                return self._made(spec, Action.MISSED, latest, "missed (catch_up = none)")
            if now - latest > spec.starting_deadline_s:
                return self._made(
                    spec, Action.MISSED, latest, "missed by more than starting_deadline"
                )
            why = f"catch-up of a fire missed {now - latest:.0f}s ago"
            return self._fire(spec, job, latest, why)
        return self._fire(spec, job, latest, "on time")

    def _latest_due(self, spec: ScheduleSpec, anchor: float, now: float) -> float | None:
        """The latest fire time in ``(anchor, now]``, or None."""
        if spec.every_s is not None:
            k = math.floor((now - anchor) / spec.every_s)
            return anchor + k * spec.every_s if k >= 1 else None
        latest = spec.latest_until(now, self.tz)
        return latest if latest > anchor else None

    def _fire(self, spec: ScheduleSpec, job: JobFacts, due: float, why: str) -> Decision:
        if job.live_run is not None:
            live = f"run {job.live_run} is live"
            if spec.overlap is Overlap.SKIP:
                return self._made(spec, Action.SKIP, due, f"{live} (overlap = skip)")
            if spec.overlap is Overlap.QUEUE:
                return self._made(spec, Action.QUEUE, due, f"{live}: queued (overlap = queue)")
            return self._made(spec, Action.REPLACE, due, f"{live}: replacing it", run=job.live_run)
        if (
            spec.on_incomplete is OnIncomplete.RESUME
            and job.previous_incomplete
            and job.previous_run is not None
        ):
            return self._made(
                spec,
                Action.RESUME,
                due,
                f"{why}; resuming {job.previous_run}",
                run=job.previous_run,
            )
        return self._made(spec, Action.FIRE, due, why)

    def _made(
        self,
        spec: ScheduleSpec,
        action: Action,
        due: float,
        reason: str,
        *,
        run: str | None = None,
    ) -> Decision:
        return Decision(spec.task, action, due, spec.next_after(due, self.tz), run, reason)


# ----------------------------------------------------------------------------- config


def parse_schedules(
    extras: Mapping[str, Mapping[str, Any]], *, where: str
) -> dict[str, ScheduleSpec]:
    """The schedule of every task that has ``schedule`` or ``every``; one-line ConfigErrors."""
    out = {}
    for task, keys in extras.items():
        spec = _spec(task, keys, f"{where}: [tasks.{task}]")
        if spec is not None:
            out[task] = spec
    return out


def _spec(task: str, keys: Mapping[str, Any], here: str) -> ScheduleSpec | None:
    given = [k for k in SCHEDULE_KEYS if k in keys]
    if not given:
        return None
    if "schedule" in keys and "every" in keys:
        raise ConfigError(f"{here} schedule: give schedule or every, not both")
    if "schedule" not in keys and "every" not in keys:
        raise ConfigError(f"{here} {given[0]}: needs schedule or every in the same task")
    cron: str | None = None
    every_s: float | None = None
    if "schedule" in keys:
        cron = _cron(keys["schedule"], here)
    else:
        try:
            every_s = parse_duration(keys["every"], where=f"{here} every (schedule)")
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
        if every_s < 1:
            raise ConfigError(
                f"{here} every (schedule): must be at least 1s, got {keys['every']!r}"
            )
    deadline = DEFAULT_STARTING_DEADLINE_S
    if "starting_deadline" in keys:
        try:
            deadline = parse_duration(keys["starting_deadline"], where=f"{here} starting_deadline")
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
    return ScheduleSpec(
        task=task,
        cron=cron,
        every_s=every_s,
        overlap=_choice(keys, "overlap", Overlap, Overlap.SKIP, here),
        catch_up=_choice(keys, "catch_up", CatchUp, CatchUp.ONCE, here),
        starting_deadline_s=deadline,
        on_incomplete=_choice(keys, "on_incomplete", OnIncomplete, OnIncomplete.START, here),
    )


def _cron(value: object, here: str) -> str:
    from cronsim import CronSim, CronSimError

    if not isinstance(value, str):
        raise ConfigError(f"{here} schedule: expected a cron expression string like '*/30 * * * *'")
    text = " ".join(value.split())
    if len(text.split(" ")) != 5:
        raise ConfigError(
            f"{here} schedule: invalid cron expression {value!r} (five fields: minute hour"
            " day-of-month month day-of-week)"
        )
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError) as exc:
        raise ConfigError(f"{here} schedule: invalid cron expression {value!r} ({exc})") from None
    return text


def _choice(
    keys: Mapping[str, Any], key: str, kind: type[enum.StrEnum], default: Any, here: str
) -> Any:
    if key not in keys:
        return default
    value = keys[key]
    choices = [str(c) for c in kind]
    if value not in choices:
        raise ConfigError(f"{here} {key}: {value!r} is not one of {', '.join(choices)}")
    return kind(value)


def local_zone(environ: Mapping[str, str] | None = None) -> tzinfo:
    """The local time zone as a DST-aware zone: ``$TZ``, else /etc/localtime, else UTC."""
    env = os.environ if environ is None else environ
    name = env.get("TZ", "").lstrip(":")
    try:
        if name:
            return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        name = ""  # an unknown $TZ: fall back like libc does, to the system zone
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC
