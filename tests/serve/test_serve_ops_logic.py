"""The operator of ``orch serve`` (schedules, services, daily gc): fake ports, fake clock."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.schedule import CatchUp, OnIncomplete, Overlap, ScheduleSpec
from orchestrator.serve import data, ops

T0 = 1_800_000_000.0


@dataclass
class FakePorts:
    live: dict[str, str | None] = field(default_factory=dict)
    newest: dict[str, tuple[str, str]] = field(default_factory=dict)
    started: list[tuple[str, list[str]]] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    pruned: list[tuple[int | None, float | None]] = field(default_factory=list)
    refuse: bool = False

    def task_runs(self, task: str) -> data.TaskRuns:
        newest = self.newest.get(task)
        return data.TaskRuns(
            self.live.get(task), newest[0] if newest else None, newest[1] if newest else None
        )

    def start(self, task: str, extra: list[str]) -> str:
        if self.refuse:
            raise data.StartFailed("orch run refused", usage=True)
        self.started.append((task, extra))
        return f"run-{len(self.started)}"

    def resume(self, run_id: str) -> None:
        self.resumed.append(run_id)

    def stop(self, run_id: str) -> bool:
        self.stopped.append(run_id)
        return True

    def prune(self, keep: int | None, older_than_s: float | None) -> tuple[int, int]:
        self.pruned.append((keep, older_than_s))
        return 2, 1000


def operator(
    tmp_path: Path,
    *specs: ScheduleSpec,
    ports: FakePorts,
    services: list[tuple[str, bool]] | None = None,
    gc: bool = False,
    started_at: float = T0,
) -> ops.Operator:
    plan = data.OpsPlan(list(specs), services or [], gc_keep=5, gc=gc)
    return ops.Operator(str(tmp_path), plan, ports, started_at, ops.read_state(str(tmp_path)))


def test_every_fires_at_each_interval_and_sleeps_until_the_next(tmp_path: Path) -> None:
    ports = FakePorts()
    op = operator(tmp_path, ScheduleSpec("tick", every_s=10), ports=ports)
    assert op.tick(T0 + 5) == []
    assert op.wake_at(T0 + 5) == T0 + 10
    [ev] = op.tick(T0 + 10)
    assert (ev["type"], ev["schedule"], ev["outcome"], ev["run"]) == (
        "schedule",
        "tick",
        "fired",
        "run-1",
    )
    assert ev["next_fire"] == T0 + 20
    assert op.tick(T0 + 15) == []
    assert [e["run"] for e in op.tick(T0 + 20.5)] == ["run-2"]
    assert ports.started == [("tick", []), ("tick", [])]
    assert op.counts == {("tick", "fired"): 2}


def test_nothing_due_reads_no_run(tmp_path: Path) -> None:
    class Counting(FakePorts):
        looked: int = 0

        def task_runs(self, task: str) -> data.TaskRuns:
            self.looked += 1
            return super().task_runs(task)

    ports = Counting()
    specs = [ScheduleSpec(f"t{i}", every_s=60) for i in range(50)]
    op = operator(tmp_path, *specs, ports=ports)
    for k in range(1, 59):
        assert op.tick(T0 + k) == []
    assert ports.looked == 0
    assert len(op.tick(T0 + 60)) == 50
    assert ports.looked == 50


def test_overlap_skip_queue_replace(tmp_path: Path) -> None:
    ports = FakePorts(live={"s": "live-s", "q": "live-q", "r": "live-r"})
    op = operator(
        tmp_path,
        ScheduleSpec("s", every_s=10),
        ScheduleSpec("q", every_s=10, overlap=Overlap.QUEUE),
        ScheduleSpec("r", every_s=10, overlap=Overlap.REPLACE),
        ports=ports,
    )
    by_task = {e["schedule"]: e for e in op.tick(T0 + 10)}
    assert by_task["s"]["outcome"] == "skipped"
    assert by_task["q"]["outcome"] == "queued"
    assert by_task["r"]["outcome"] == "replaced"
    assert ports.stopped == ["live-r"]
    assert ports.started == [("r", [])]
    # the queued fire is checked once a second until the live run ends
    assert op.wake_at(T0 + 10) == T0 + 11
    ports.live = {"s": "live-s", "r": "run-1"}  # q's run ended
    events = op.tick(T0 + 11)
    assert [(e["schedule"], e["outcome"]) for e in events] == [("q", "fired")]
    assert op.state["tasks"]["q"]["queued"] is False
    assert op.counts[("s", "skipped")] == 1


def test_on_incomplete_resume_resumes_a_stopped_or_lost_run(tmp_path: Path) -> None:
    ports = FakePorts(newest={"a": ("old-a", "stopped"), "b": ("old-b", "done")})
    op = operator(
        tmp_path,
        ScheduleSpec("a", every_s=10, on_incomplete=OnIncomplete.RESUME),
        ScheduleSpec("b", every_s=10, on_incomplete=OnIncomplete.RESUME),
        ports=ports,
    )
    outcomes = {e["schedule"]: (e["outcome"], e["run"]) for e in op.tick(T0 + 10)}
    assert outcomes == {"a": ("resumed", "old-a"), "b": ("fired", "run-1")}
    assert ports.resumed == ["old-a"]


def test_a_refused_start_is_a_failed_outcome(tmp_path: Path) -> None:
    ports = FakePorts(refuse=True)
    op = operator(tmp_path, ScheduleSpec("x", every_s=10), ports=ports)
    [ev] = op.tick(T0 + 10)
    assert ev["outcome"] == "failed" and "orch run refused" in ev["reason"]
    assert op.counts == {("x", "failed"): 1}


def test_state_survives_a_restart_and_a_missed_fire_is_caught_up_once(tmp_path: Path) -> None:
    ports = FakePorts()
    spec = ScheduleSpec("h", every_s=600, catch_up=CatchUp.ONCE, starting_deadline_s=3600)
    op = operator(tmp_path, spec, ports=ports)
    op.tick(T0 + 600)
    path = Path(ops.state_path(str(tmp_path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    # serve was down from T0+700 to T0+2000: fires at +1200 and +1800 were missed
    later = operator(tmp_path, spec, ports=ports, started_at=T0 + 2000)
    assert later.state["tasks"]["h"]["last_fire"] == T0 + 600
    events = later.tick(T0 + 2000)
    assert [(e["outcome"], e["due"]) for e in events] == [("fired", T0 + 1800)]
    assert later.tick(T0 + 2001) == []
    rows = ops.rows(later.scheduler, ops.read_state(str(tmp_path)))
    assert rows[0]["last_fire"] == T0 + 1800 and rows[0]["next_fire"] == T0 + 2400
    assert rows[0]["last_outcome"] == "fired" and rows[0]["last_run"] == "run-2"


def test_catch_up_none_and_past_deadline_are_missed(tmp_path: Path) -> None:
    ports = FakePorts()
    a = ScheduleSpec("a", every_s=600, catch_up=CatchUp.NONE)
    b = ScheduleSpec("b", every_s=600, starting_deadline_s=60)
    op = operator(tmp_path, a, b, ports=ports)
    events = op.tick(T0 + 1000)
    assert sorted((e["schedule"], e["outcome"]) for e in events) == [
        ("a", "missed"),
        ("b", "missed"),
    ]
    assert ports.started == []


def test_services_start_once_and_default_to_restart_always(tmp_path: Path) -> None:
    ports = FakePorts(live={"up": "live-up"})
    op = operator(tmp_path, ports=ports, services=[("up", False), ("svc", False), ("own", True)])
    events = op.startup(T0)
    assert [(e["service"], e["outcome"]) for e in events] == [
        ("up", "running"),
        ("svc", "started"),
        ("own", "started"),
    ]
    assert ports.started == [("svc", ["--restart", "always"]), ("own", [])]


def test_gc_runs_daily_and_remembers_across_restarts(tmp_path: Path) -> None:
    ports = FakePorts()
    op = operator(tmp_path, ports=ports, gc=True)
    [ev] = op.tick(T0)
    assert ev == {"type": "gc", "outcome": "done", "removed": 2, "bytes": 1000}
    assert op.tick(T0 + 3600) == []
    assert op.wake_at(T0 + 3600) == T0 + 3600 + ops.MAX_SLEEP_S
    again = operator(tmp_path, ports=ports, gc=True, started_at=T0 + 7200)
    assert again.tick(T0 + 7200) == []
    assert len(again.tick(T0 + ops.GC_EVERY_S)) == 1
    assert ports.pruned == [(5, None), (5, None)]


def test_a_second_operator_on_the_home_does_not_get_the_lock(tmp_path: Path) -> None:
    fd = ops.take_lock(str(tmp_path))
    assert fd is not None
    try:
        assert ops.take_lock(str(tmp_path)) is None
    finally:
        os.close(fd)
    fd2 = ops.take_lock(str(tmp_path))
    assert fd2 is not None
    os.close(fd2)
