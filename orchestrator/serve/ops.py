"""Operating jobs from ``orch serve``: schedules, services, daily pruning, deliverers.

``Operator`` is one asyncio task of the server. It never blocks the loop:
each step (``tick``) runs in a worker thread, and the loop only publishes
the events a step returns and sleeps until the next fire (``wake_at``), a
queued fire's check (once a second while one waits), the next daily prune,
or a minute at most (a wall-clock jump is noticed within a minute). With
nothing due a step reads no run store at all: the first pass of
``Scheduler.decide`` uses only the persisted last fires, and the runs of a
task are looked up only when that task is due.

What it remembers lives in ``<home>/serve/schedules.json`` (0600): each
task's last fire, whether a fire is queued, the last outcome and run, when
serve started (what an ``every`` schedule never fired is anchored to) and
when it last pruned. A serve restart reads it back, so a fire missed while
serve was down is caught up once (``catch_up``) and a daily prune stays daily.

Only one serve per home operates: ``<home>/serve/ops.lock`` (flock) is held
for the life of the serve that took it; another serve on the same home (and
any ``--read-only`` serve) fires nothing and says so once.

Services (``autostart = true``) are started when serve starts unless a live
run of that name exists (one live run per name: a serve restart never starts
a second copy). A service task that does not set ``restart`` is started with
``--restart always``: the master keeps its shards running, with backoff.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from orchestrator.serve import data

STATE_FILE = "schedules.json"
LOCK_FILE = "ops.lock"
GC_EVERY_S = 86400.0
#: How often a queued fire checks whether the live run ended.
QUEUE_POLL_S = 1.0
#: The longest sleep: a wall-clock jump is noticed within this.
MAX_SLEEP_S = 60.0
#: Run states after which ``on_incomplete = "resume"`` resumes instead of starting over.
INCOMPLETE = ("stopped", "lost")


def state_dir(home: str) -> str:
    return os.path.join(home, "serve")


def state_path(home: str) -> str:
    return os.path.join(state_dir(home), STATE_FILE)


def read_state(home: str) -> dict[str, Any]:
    """The persisted state, or an empty one when there is none (or it is unreadable)."""
    try:
        with open(state_path(home), "rb") as f:
            state = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return {"tasks": {}}
    if not isinstance(state, dict) or not isinstance(state.get("tasks"), dict):
        return {"tasks": {}}
    return state


def write_state(home: str, state: dict[str, Any]) -> None:
    """Replace the state file atomically (0600, in a 0700 directory)."""
    d = state_dir(home)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".{STATE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    finally:
        os.close(fd)
    os.replace(tmp, state_path(home))


def take_lock(home: str) -> int | None:
    """The operator's lock on ``home`` (an open fd to keep), or None when another serve has it."""
    d = state_dir(home)
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(d, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Ports(Protocol):
    """What a step does to the world (the real one is ``RealPorts``; tests pass fakes)."""

    def task_runs(self, task: str) -> data.TaskRuns: ...
    def start(self, task: str, extra: list[str]) -> str: ...
    def resume(self, run_id: str) -> None: ...
    def stop(self, run_id: str) -> bool: ...
    def prune(self, keep: int | None, older_than_s: float | None) -> tuple[int, int]: ...


@dataclass
class RealPorts:
    home: str
    config_path: str

    def task_runs(self, task: str) -> data.TaskRuns:
        return data.task_runs(self.home, task)

    def start(self, task: str, extra: list[str]) -> str:
        return data.start_named(self.config_path, task, self.home, extra)

    def resume(self, run_id: str) -> None:
        data.resume_run(run_id, self.home)

    def stop(self, run_id: str) -> bool:
        return data.stop_and_wait(self.home, run_id)

    def prune(self, keep: int | None, older_than_s: float | None) -> tuple[int, int]:
        return data.prune(self.home, keep, older_than_s)


@dataclass
class Operator:
    """Fires schedules, starts services, prunes daily; ``tick`` is one step at ``now``."""

    home: str
    plan: data.OpsPlan
    ports: Ports
    started_at: float
    state: dict[str, Any] = field(default_factory=lambda: {"tasks": {}})
    persist: bool = True
    #: (job, outcome) -> how many: ``orch_schedule_runs_total``
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    scheduler: Any = field(init=False)

    def __post_init__(self) -> None:
        names = {s.task for s in self.plan.schedules}
        tasks = self.state.setdefault("tasks", {})
        for gone in [t for t in tasks if t not in names]:
            del tasks[gone]
        self.state["started_at"] = self.started_at
        self.scheduler = data.make_scheduler(self.plan.schedules, self.started_at)

    # --- state --------------------------------------------------------------------

    def _task(self, task: str) -> dict[str, Any]:
        out: dict[str, Any] = self.state["tasks"].setdefault(task, {})
        return out

    def _light(self) -> dict[str, Any]:
        """Facts from the state alone (no run is read): enough to know who is due."""
        out = {}
        for spec in self.plan.schedules:
            st = self.state["tasks"].get(spec.task, {})
            out[spec.task] = data.job_facts(st.get("last_fire"), queued=bool(st.get("queued")))
        return out

    def _save(self) -> None:
        if self.persist:
            write_state(self.home, self.state)

    # --- steps --------------------------------------------------------------------

    def startup(self, now: float) -> list[dict[str, Any]]:
        """Start the services that have no live run."""
        events = []
        for task, sets_restart in self.plan.services:
            try:
                live = self.ports.task_runs(task).live
            except data.OrchError as exc:
                events.append(self._service(task, "failed", None, str(exc)))
                continue
            if live is not None:
                events.append(self._service(task, "running", live, "a live run exists"))
                continue
            extra = [] if sets_restart else ["--restart", "always"]
            try:
                run = self.ports.start(task, extra)
            except data.OrchError as exc:
                events.append(self._service(task, "failed", None, str(exc)))
                continue
            events.append(self._service(task, "started", run, "autostart"))
        return events

    @staticmethod
    def _service(task: str, outcome: str, run: str | None, reason: str) -> dict[str, Any]:
        return {
            "type": "service",
            "service": task,
            "outcome": outcome,
            "run": run,
            "reason": reason,
        }

    def tick(self, now: float) -> list[dict[str, Any]]:
        """Carry out what is due at ``now``: the events to publish."""
        events: list[dict[str, Any]] = []
        light = self._light()
        due = {d.task for d in self.scheduler.decide(now, light)}
        if due:
            facts = dict(light)
            for task in due:
                facts[task] = self._facts(task, light[task])
            for decision in self.scheduler.decide(now, facts):
                if decision.task in due:
                    events.append(self._carry_out(decision))
            self._save()
        if self.plan.gc and now - float(self.state.get("gc_at") or 0) >= GC_EVERY_S:
            events.append(self._prune(now))
            self._save()
        return events

    def _facts(self, task: str, light: Any) -> Any:
        try:
            tr = self.ports.task_runs(task)
        except data.OrchError:
            return light
        previous = tr.newest if tr.live is None else None
        return data.job_facts(
            light.last_fire,
            live_run=tr.live,
            queued=light.queued,
            previous_run=previous,
            previous_incomplete=previous is not None and tr.newest_state in INCOMPLETE,
        )

    def _carry_out(self, d: Any) -> dict[str, Any]:
        st = self._task(d.task)
        outcome, run, reason = str(d.action), d.run, d.reason
        try:
            if outcome == "fired":
                run = self.ports.start(d.task, [])
            elif outcome == "resumed":
                self.ports.resume(d.run)
            elif outcome == "replaced":
                if not self.ports.stop(d.run):
                    raise data.OrchError(f"run {d.run} did not stop in time")
                run = self.ports.start(d.task, [])
        except data.OrchError as exc:
            outcome, reason = "failed", f"{reason}: {exc}"
        st["last_fire"] = d.due
        if outcome == "queued":
            st["queued"] = True
        elif outcome in ("fired", "resumed", "replaced", "failed"):
            st["queued"] = False
        st["last_outcome"] = outcome
        if run is not None and outcome != "skipped":
            st["last_run"] = run
        key = (d.task, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        return {
            "type": "schedule",
            "schedule": d.task,
            "outcome": outcome,
            "run": run,
            "due": d.due,
            "next_fire": d.next_fire,
            "reason": reason,
        }

    def _prune(self, now: float) -> dict[str, Any]:
        self.state["gc_at"] = now
        try:
            removed, freed = self.ports.prune(self.plan.gc_keep, self.plan.gc_older_than_s)
        except data.OrchError as exc:
            return {"type": "gc", "outcome": "failed", "reason": str(exc)}
        return {"type": "gc", "outcome": "done", "removed": removed, "bytes": freed}

    def wake_at(self, now: float) -> float:
        """When the next step is needed (never later than ``MAX_SLEEP_S`` from now)."""
        light = self._light()
        times = [now + MAX_SLEEP_S]
        nxt = self.scheduler.wake_at(now, light)
        if nxt is not None:
            times.append(nxt)
        if any(f.queued for f in light.values()):
            times.append(now + QUEUE_POLL_S)
        if self.plan.gc:
            times.append(float(self.state.get("gc_at") or 0) + GC_EVERY_S)
        return min(times)

    def listing(self) -> list[dict[str, Any]]:
        return rows(self.scheduler, self.state)


def rows(scheduler: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    """``Scheduler.listing`` with each task's last outcome, last run and queued flag."""
    tasks = state.get("tasks", {})
    facts = {t: data.job_facts(st.get("last_fire")) for t, st in tasks.items()}
    out = scheduler.listing(facts)
    for row in out:
        st = tasks.get(row["task"], {})
        row["last_outcome"] = st.get("last_outcome")
        row["last_run"] = st.get("last_run")
        row["queued"] = bool(st.get("queued"))
    return out


def schedule_rows(home: str, config_path: str | None) -> list[dict[str, Any]]:
    """What ``orch schedules`` and ``GET /api/v1/schedules`` list, from orch.toml and the state."""
    plan = data.ops_plan(config_path)
    state = read_state(home)
    started = state.get("started_at")
    scheduler = data.make_scheduler(plan.schedules, float(started or time.time()))
    return rows(scheduler, state)


# --- in the server -------------------------------------------------------------------


class Running:
    """The operator as an asyncio task of ``orch serve`` (see ``build_app``)."""

    def __init__(
        self,
        home: str,
        config_path: str | None,
        publish: Callable[[dict[str, Any]], None],
        *,
        enabled: bool = True,
    ) -> None:
        self.home = home
        self.config_path = config_path
        self.publish = publish
        self.enabled = enabled
        self.operator: Operator | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: int | None = None

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(self.operator.counts) if self.operator is not None else {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._main())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _say(self, text: str) -> None:
        print(f"orch serve: {text}", flush=True)

    def _log(self, ev: dict[str, Any]) -> None:
        if ev["type"] == "schedule":
            run = f" run {ev['run']}" if ev.get("run") else ""
            self._say(f"schedule {ev['schedule']}: {ev['outcome']}{run} ({ev['reason']})")
        elif ev["type"] == "service":
            run = f" run {ev['run']}" if ev.get("run") else ""
            self._say(f"service {ev['service']}: {ev['outcome']}{run} ({ev['reason']})")
        elif ev["type"] == "gc" and ev["outcome"] == "done":
            self._say(f"gc: removed {ev['removed']} runs, freed {ev['bytes']} bytes")
        elif ev["type"] == "gc":
            self._say(f"gc: failed ({ev['reason']})")

    def _emit(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self._log(ev)
            self.publish(ev)

    def _setup(self, now: float) -> list[dict[str, Any]]:
        for run_dir in data.pending_outboxes(self.home):
            data.launch_deliverer(run_dir)
        plan = data.ops_plan(self.config_path)
        if not (plan.schedules or plan.services or plan.gc):
            return []
        self._lock = take_lock(self.home)
        if self._lock is None:
            self._say("another orch serve operates this home: no schedules, services or gc here")
            return []
        assert self.config_path is not None
        self.operator = Operator(
            self.home, plan, RealPorts(self.home, self.config_path), now, read_state(self.home)
        )
        self.operator._save()
        return self.operator.startup(now)

    async def _main(self) -> None:
        if not self.enabled:
            return
        try:
            self._emit(await asyncio.to_thread(self._setup, time.time()))
            op = self.operator
            if op is None:
                return
            while True:
                self._emit(await asyncio.to_thread(op.tick, time.time()))
                now = time.time()
                await asyncio.sleep(max(0.05, op.wake_at(now) - now))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server lives on; say why schedules stopped
            self._say(f"schedules stopped: {type(exc).__name__}: {exc}")
            print(f"orch serve: schedules stopped: {exc}", file=sys.stderr, flush=True)


# --- orch schedules ------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def schedules_command(config: str | None, home: str | None, as_json: bool) -> int:
    """``orch schedules``: each scheduled task with its last and next fire."""
    if config is not None:
        path = os.path.abspath(config)
        if not os.path.isfile(path):
            raise data.BadUsage(f"--config {config}: no such file")
    else:
        path = os.path.abspath(data.DEFAULT_CONFIG)
        if not os.path.isfile(path):
            raise data.BadUsage(f"no {data.DEFAULT_CONFIG} here (give --config FILE)")
    out = schedule_rows(data.home_dir(home), path)
    if as_json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return data.EXIT_OK
    if not out:
        print(f"no scheduled tasks in {path}")
        return data.EXIT_OK
    table = [("TASK", "SCHEDULE", "LAST FIRE", "OUTCOME", "NEXT FIRE", "OVERLAP")]
    for r in out:
        table.append(
            (
                r["task"],
                r["schedule"],
                _when(r["last_fire"]),
                r["last_outcome"] or "-",
                _when(r["next_fire"]),
                r["overlap"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()
    return data.EXIT_OK
