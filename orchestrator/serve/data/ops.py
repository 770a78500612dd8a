"""Operating jobs for ``orch serve``: schedules, services, pruning, notification deliverers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator import runs
from orchestrator.configfile import load_config
from orchestrator.errors import MasterUnreachable, OrchError
from orchestrator.serve.data.runs import master_alive, query, resolve, run_dirs, run_facts
from orchestrator.serve.data.steer import send, start_task


@dataclass(frozen=True, slots=True)
class OpsPlan:
    """What serve operates from orch.toml: schedules, services (autostart) and ``[gc]``."""

    schedules: list[Any]  # ScheduleSpec, in the file's order
    services: list[tuple[str, bool]]  # (task, whether the task sets ``restart`` itself)
    gc_keep: int | None = None
    gc_older_than_s: float | None = None
    gc: bool = False


def ops_plan(config_path: str | None) -> OpsPlan:
    """The schedules, autostart tasks and ``[gc]`` of the served orch.toml (empty without one)."""
    if config_path is None:
        return OpsPlan([], [])
    from orchestrator.opsconfig import ops_config

    cfg = load_config(config_path)
    ops = ops_config(cfg)
    services = [
        (name, "restart" in table)
        for name, table in cfg.tasks.items()
        if table.get("autostart") is True
    ]
    gc = ops.gc
    return OpsPlan(
        schedules=list(ops.schedules.values()),
        services=services,
        gc_keep=gc.keep_runs if gc else None,
        gc_older_than_s=gc.older_than_s if gc else None,
        gc=gc is not None,
    )


def make_scheduler(specs: list[Any], started_at: float) -> Any:
    """A ``schedule.Scheduler`` over ``specs`` in the local time zone."""
    from orchestrator.schedule import Scheduler, local_zone

    return Scheduler(specs, local_zone(), started_at)


def job_facts(last_fire: float | None = None, **kw: Any) -> Any:
    """A ``schedule.JobFacts``."""
    from orchestrator.schedule import JobFacts

    return JobFacts(last_fire=last_fire, **kw)


@dataclass(frozen=True, slots=True)
class TaskRuns:
    """A task's newest live run, and its newest run with the state it ended in."""

    live: str | None
    newest: str | None
    newest_state: str | None


def task_runs(home: str, task: str) -> TaskRuns:
    """The runs named ``task`` (what ``orch run TASK`` names them), newest first."""
    live = runs.live_runs(home, task)
    newest: str | None = None
    newest_state: str | None = None
    for d in run_dirs(home):
        try:
            store = d.read()
        except OrchError:
            continue
        try:
            row = store.run()
        except OrchError:
            continue
        finally:
            store.close()
        if (row.get("name") or "") == task:
            newest, newest_state = row["id"], runs.run_state(row)
            break
    return TaskRuns(live[0].id if live else None, newest, newest_state)


def start_named(
    config_path: str, name: str, home: str, extra: list[str], timeout_s: float = 30.0
) -> str:
    """``orch run NAME --config FILE -d EXTRA...``: the new run's id."""
    return start_task(config_path, name, home, timeout_s, tuple(extra))


def stop_and_wait(home: str, run_id: str, timeout_s: float = 120.0) -> bool:
    """Ask a live run to stop and wait until it is no longer live; whether it ended in time."""
    d = resolve(home, run_id)
    facts = run_facts(d)
    if facts is None or facts.state != "running" or not facts.control:
        return True
    try:
        send(facts.control, "stop")
    except MasterUnreachable:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        f = run_facts(d)
        if f is None or f.state != "running" or not master_alive(f):
            return True
        time.sleep(0.1)  # allowed-sleep: poll interval while the stopped run ends
    return False


def prune(home: str, keep: int | None, older_than_s: float | None) -> tuple[int, int]:
    """``orch gc`` with ``[gc]``'s limits: (runs removed, bytes freed)."""
    from orchestrator.prune import collect

    removed, total = collect(home, keep=keep, older_than_s=older_than_s)
    return len(removed), total


def pending_outboxes(home: str) -> list[str]:
    """Run directories with notifications neither delivered nor given up."""
    out = []
    for d in run_dirs(home):
        try:
            rows = query(
                d,
                "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL",
            )
        except OrchError:
            continue  # no outbox table (a run from before notifications), or unreadable
        if rows and rows[0][0]:
            out.append(d.path)
    return out


def launch_deliverer(run_dir: str) -> bool:
    """Start a detached notification deliverer for the run unless one runs already."""
    from orchestrator.notify.deliver import launch_deliverer as launch

    return launch(run_dir) is not None
