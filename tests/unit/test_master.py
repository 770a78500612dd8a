"""Event histories replayed through the real ``Master`` with fake ports and a fake clock.

No process, no socket, no sleep: the backend records what it is asked to
start and signal, and the test says when an attempt exits; the heartbeat
channel delivers messages the test writes and records the replies; the
loop's selector never has anything to read and, when the loop would wait,
moves the fake clock forward to the next timer (the way trio's autojump
clock does). The store is a real SQLite file that also records every write,
so each history asserts the exact actions and the exact rows written.
"""

from __future__ import annotations

import selectors
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends import AttemptHandle, AttemptSpec, Backend, Stream
from orchestrator.config import Restart, TaskConfig
from orchestrator.errors import RET_FAILED, RET_INTERRUPTED, RET_OK, SpawnError
from orchestrator.lifecycle import TimerKind
from orchestrator.loop import Loop
from orchestrator.master import Master
from orchestrator.ports import Ports, Steerable, View
from orchestrator.progress import PROGRESS_FLUSH_S
from orchestrator.sources import load_shards
from orchestrator.store import RunRow, Store
from shards import protocol as proto

RUN = "run-1"
T0 = 100.0  # the fake monotonic clock at the start of every history
WALL0 = 1_700_000_000.0  # the fake wall clock at the same instant

Trace = list[tuple[Any, ...]]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + (self.now - T0)


class AutoSelector(selectors.BaseSelector):
    """Nothing is ever readable; a wait moves the clock forward by the timeout instead."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, 0, events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert timeout is not None, "the master would wait forever"
        self.clock.now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map


class FakeBackend(Backend):
    """Records starts and signals; an attempt 'runs' until the test makes it exit."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.running: dict[int, AttemptHandle] = {}
        self.specs: list[AttemptSpec] = []
        self.fail: dict[int, SpawnError] = {}
        self.memory: dict[int, int] = {}
        self._pid = 1000
        self._new: list[AttemptHandle] = []
        #: index -> attempt a previous master left alive (what ``reattach`` finds).
        self.alive: dict[int, int] = {}

    def start(self, spec: AttemptSpec) -> AttemptHandle:
        self.trace.append(("start", spec.shard_id, spec.attempt))
        if spec.index in self.fail:
            raise self.fail[spec.index]
        assert spec.index not in self.running, "two live attempts of one shard"
        self._pid += 1
        handle = AttemptHandle(spec=spec, pid=self._pid, pgid=self._pid, create_time=None)
        self.running[spec.index] = handle
        self.specs.append(spec)
        self._new.append(handle)
        return handle

    def signal(self, handle: AttemptHandle, signum: int) -> None:
        name = signal.Signals(signum).name
        self.trace.append(("signal", handle.spec.shard_id, handle.spec.attempt, name))

    def kill_all(self) -> None:
        self.trace.append(("kill_all",))

    def live(self) -> list[AttemptHandle]:
        return list(self.running.values())

    def reap(self) -> None:
        self.trace.append(("reap",))

    def stamp(self) -> list[AttemptHandle]:
        new, self._new = self._new, []
        for handle in new:
            handle.create_time = float(handle.pid or 0) + 0.5
        return new

    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        return [self.memory.get(h.spec.index) for h in handles]

    def reattach(self, spec: AttemptSpec) -> AttemptHandle | None:
        self.trace.append(("reattach", spec.shard_id, spec.attempt))
        if self.alive.get(spec.index) != spec.attempt:
            return None
        handle = AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)
        self.running[spec.index] = handle
        return handle

    # --- what the test makes happen ---

    def place(self, index: int, node: str) -> None:
        assert self.listener is not None
        self.listener.on_node(self.running[index], node)

    def queue(self, index: int, why: str) -> None:
        """The attempt waits for a node with room (a backend that places attempts)."""
        assert self.listener is not None
        self.listener.on_waiting(self.running[index], why)

    def lose(self, index: int, node: str) -> None:
        handle = self.running.pop(index)
        assert self.listener is not None
        self.listener.on_lost(handle, f"node lost: {node}")

    def exit(self, index: int, code: int) -> None:
        handle = self.running.pop(index)
        assert self.listener is not None
        self.listener.on_exit(handle, code)

    def output(self, index: int, stream: Stream, data: bytes) -> None:
        assert self.listener is not None
        self.listener.on_output(self.running[index], stream, data)


class FakeChannel:
    endpoint = "ipc:///fake/hb.sock"

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.received = 0
        self.garbage = 0
        self.on_reply: Callable[[proto.Message], None] | None = None
        self._on_message: Callable[[bytes, proto.Message], None] | None = None

    def bind(self, on_message: Callable[[bytes, proto.Message], None], on_heartbeat: Any) -> None:
        self._on_message = on_message  # heartbeats are delivered as messages here

    def reply(self, identity: bytes, msg: proto.Message) -> None:
        self.trace.append(("reply", msg.kind.value, msg.shard, msg.attempt, msg.seq))
        if self.on_reply is not None:
            self.on_reply(msg)

    def close(self) -> None:
        self.trace.append(("close", "channel"))

    def deliver(self, msg: proto.Message) -> None:
        assert self._on_message is not None
        self.received += 1
        self._on_message(b"peer", msg)


class FakeControl:
    endpoint = "ipc:///fake/control.sock"

    def __init__(self) -> None:
        self.master: Steerable | None = None

    def bind(self, master: Steerable) -> None:
        self.master = master

    def close(self) -> None:
        pass


class FakeEvents:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.closed = False

    def publish(self, event: dict[str, Any]) -> None:
        self.published.append(event)

    def close(self) -> None:
        self.closed = True


class FakeGuard:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.closed: bool | None = None

    def watch(self, pgid: int) -> None:
        self.log.append(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self.log.append(f"-{pgid}")

    def flush(self) -> None:
        pass

    def close(self, clean: bool = True) -> None:
        self.closed = clean


class RecordingView(View):
    def __init__(self) -> None:
        self.events: list[str] = []

    def event(self, text: str) -> None:
        self.events.append(text)


class RecordingStore(Store):
    """The real store, writing a real file, that also remembers what it was asked to write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: Trace = []
        self.trace: Trace = []

    def set_shard(self, idx: int, **fields: Any) -> None:
        self.writes.append(("shard", idx, fields))
        super().set_shard(idx, **fields)

    def set_run(self, **fields: Any) -> None:
        self.writes.append(("run", fields))
        super().set_run(**fields)

    def set_progress_many(self, rows: Any) -> None:
        rows = list(rows)
        self.writes.append(("progress", rows))
        super().set_progress_many(rows)

    def add_counter(self, name: str, delta: int) -> None:
        self.writes.append(("counter", name, delta))
        super().add_counter(name, delta)

    def commit(self) -> None:
        if self.dirty:
            self.trace.append(("commit",))
        super().commit()


class Harness:
    """One master over ``n`` shards (``--split n``) with fake ports; drives it step by step."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        n: int = 1,
        jobs: int | None = None,
        retry_failed: bool = False,
        prepare: Callable[[Store], None] | None = None,
        reattach: bool = False,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.trace: Trace = []
        self.task = TaskConfig(command=("work", "{index}"), split=n, cwd=str(tmp_path), **settings)
        shards = load_shards(split=n)
        run_dir = tmp_path / "run"
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.db = str(run_dir / "state.db")
        store = RecordingStore.create(
            self.db,
            RunRow(
                id=RUN,
                name="t",
                task_json=self.task.to_json(),
                source=shards.source,
                shard_count=n,
                started_at=WALL0,
                jobs=jobs,
            ),
            ((s.id, s.record, s.line) for s in shards),
        )
        assert isinstance(store, RecordingStore)
        if prepare is not None:
            prepare(store)
            store.commit()
            store.writes.clear()
        store.trace = self.trace
        self.store = store
        self.loop = Loop(self.clock, selector=AutoSelector(self.clock), os_signals=False)
        self.backend = FakeBackend(self.trace)
        self.channel = FakeChannel(self.trace)
        self.control = FakeControl()
        self.events = FakeEvents()
        self.guard = FakeGuard()
        self.view = RecordingView()
        self.master = Master(
            run_id=RUN,
            run_dir=str(run_dir),
            task=self.task,
            shards=shards,
            store=store,
            ports=Ports(
                loop=self.loop,
                backend=self.backend,
                channel=self.channel,
                control=self.control,
                events=self.events,
                guardian=self.guard,
                wall=self.clock.wall,
                rand=lambda: 0.0,  # no jitter: backoff delays are the nominal ones
                reattach=reattach,
            ),
            jobs=jobs if jobs is not None else n,
            view=self.view,
            retry_failed=retry_failed,
        )
        self.closed = False

    # --- driving ---

    def open(self) -> None:
        self.master.open()
        self.settle()

    def settle(self) -> None:
        """Run what the last event queued (dispatch, group commit) without moving the clock."""
        for _ in range(4):
            self.loop.run_once(0)

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass: every timer due meanwhile fires at its own instant."""
        until = self.clock.now + seconds
        while self.clock.now < until - 1e-9:
            self.loop.run_once(until - self.clock.now)
        self.clock.now = until
        self.settle()

    def exit(self, index: int, code: int) -> None:
        self.backend.exit(index, code)
        self.settle()

    def lose(self, index: int, node: str) -> None:
        self.backend.lose(index, node)
        self.settle()

    def message(self, kind: proto.Kind, shard: str, attempt: int, **fields: Any) -> None:
        self.channel.deliver(
            proto.Message(kind=kind, run=RUN, shard=shard, attempt=attempt, **fields)
        )

    def close(self) -> int:
        self.closed = True
        code = self.master.close()
        for run in self.master.shard_runs:
            run.close_logs()
        return code

    # --- looking ---

    def actions(self) -> Trace:
        return [t for t in self.trace if t[0] in ("start", "signal", "kill_all")]

    def states(self, idx: int) -> list[str]:
        """Every state written for shard ``idx``, in order."""
        return [
            w[2]["state"] for w in self.store.writes if w[:2] == ("shard", idx) and "state" in w[2]
        ]

    def row(self, idx: int) -> dict[str, Any]:
        row = self.store.shard(idx)
        assert row is not None
        return row

    def timer(self, idx: int, kind: TimerKind) -> float | None:
        at = self.loop.timers.at((idx, kind))
        return None if at is None else at - T0


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kwargs: Any) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", **kwargs)
        made.append(h)
        return h

    yield factory
    for h in made:
        if not h.closed:
            h.close()
        h.store.close()


HB = proto.Kind.HEARTBEAT
CP = proto.Kind.CHECKPOINT


# --- an attempt ends ---


def test_exit_0_ends_the_shard_done_with_every_fact_written_once(make: Any) -> None:
    h = make(n=1)
    h.open()
    assert h.actions() == [("start", "0", 1)]
    assert h.guard.log == ["+1001"]
    h.wait(3.0)
    h.exit(0, 0)
    wall = WALL0 + 3.0
    shard_writes = [w for w in h.store.writes if w[0] == "shard"]
    assert shard_writes == [
        ("shard", 0, {"state": "running", "reason": None, "updated_at": WALL0}),
        (
            "shard",
            0,
            {
                "attempts": 1,
                "pid": 1001,
                "pgid": 1001,
                "pid_create_time": None,
                "started_at": WALL0,
                "ended_at": None,
                "exit_code": None,
                "signal": None,
                "done": None,
                "start_done": None,
                "rss_bytes": None,
            },
        ),
        ("shard", 0, {"pid": None, "ended_at": wall, "exit_code": 0, "signal": None}),
        ("shard", 0, {"state": "done", "reason": "exit 0", "updated_at": wall}),
    ]
    (attempt,) = h.store.attempts(0)
    assert attempt["started_at"] == WALL0 and attempt["ended_at"] == wall
    assert (attempt["exit_code"], attempt["signal"], attempt["reason"]) == (0, None, "exit 0")
    assert attempt["create_time"] == 1001.5  # stamped in the group commit after the spawn
    assert h.guard.log == ["+1001", "-1001"]
    assert h.master.finished and h.master.run_state() == "done"
    assert h.close() == RET_OK
    assert h.events.published[-1] == {"run": "done", "exit_code": RET_OK}
    assert h.store.run()["state"] == "done" and h.guard.closed is True


def test_nonzero_exit_backs_off_then_restarts(make: Any) -> None:
    h = make(n=1, backoff_initial_s=2.0)
    h.open()
    h.wait(1.0)
    h.exit(0, 3)  # the first failure of a streak is restarted at once
    assert h.states(0) == ["running", "pending", "running"]
    assert h.actions() == [("start", "0", 1), ("start", "0", 2)]
    h.exit(0, 3)  # the second waits backoff_initial
    assert h.states(0)[-1] == "backoff"
    assert h.timer(0, TimerKind.BACKOFF) == pytest.approx(3.0)
    assert h.row(0)["last_error"] == "exit 3"
    h.wait(1.99)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2)]
    h.wait(0.02)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2), ("start", "0", 3)]
    assert h.states(0) == ["running", "pending", "running", "backoff", "pending", "running"]
    assert [a["reason"] for a in h.store.attempts(0)] == ["exit 3", "exit 3", None]


def test_exit_by_signal_records_the_signal_not_an_exit_code(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.exit(0, -9)
    (attempt, *_) = h.store.attempts(0)
    assert (attempt["exit_code"], attempt["signal"]) == (None, 9)
    assert attempt["reason"] == "signal 9 (SIGKILL)"
    assert h.states(0) == ["running", "pending", "running"]  # restarted at once
    assert h.view.events == ["shard 0 attempt 1: signal 9 (SIGKILL)"]


def test_gives_up_after_max_restarts(make: Any) -> None:
    h = make(n=1, max_restarts=2, backoff_initial_s=0.5)
    h.open()
    for attempt in (1, 2, 3):
        assert h.actions()[-1] == ("start", "0", attempt)
        h.exit(0, 1)
        h.wait(5.0)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2), ("start", "0", 3)]
    row = h.row(0)
    assert row["state"] == "failed"
    assert row["reason"] == "gave up after 3 attempts (last: exit 1)"
    assert "shard 0 failed: gave up after 3 attempts (last: exit 1)" in h.view.events
    assert h.master.run_state() == "failed" and h.master.exit_code() == RET_FAILED


def test_restart_never_fails_at_the_first_nonzero_exit(make: Any) -> None:
    h = make(n=1, restart=Restart.NEVER)
    h.open()
    h.exit(0, 2)
    assert h.states(0) == ["running", "failed"]
    assert h.row(0)["reason"] == "exit 2"
    assert h.loop.timers.at((0, TimerKind.BACKOFF)) is None


def test_restart_always_starts_again_after_exit_0(make: Any) -> None:
    h = make(n=1, restart=Restart.ALWAYS, backoff_initial_s=1.0)
    h.open()
    h.exit(0, 0)
    assert h.states(0) == ["running", "pending", "running"]
    assert h.actions() == [("start", "0", 1), ("start", "0", 2)]
    h.exit(0, 0)  # a quick second exit is paced by the backoff
    assert h.states(0)[-1] == "backoff"
    h.wait(1.0)
    assert h.actions()[-1] == ("start", "0", 3)


# --- hung, stalled, memory ---


def test_late_heartbeat_means_hung_sigterm_grace_then_sigkill(make: Any) -> None:
    h = make(n=1, heartbeat_timeout_s=10.0, stop_timeout_s=5.0, backoff_initial_s=1.0)
    h.open()
    h.wait(1.0)
    h.message(HB, "0", 1)
    h.wait(9.9)  # 10.9 s: the last heartbeat is 9.9 s old
    assert h.actions() == [("start", "0", 1)]
    h.wait(0.2)  # 11.1 s: it is 10.1 s old
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")
    assert h.states(0) == ["running", "stopping"]
    assert h.timer(0, TimerKind.GRACE) == pytest.approx(16.0)
    assert h.view.events == [
        "shard 0: hung: no heartbeat for 10s (since the last one); killing attempt 1"
    ]
    h.wait(4.8)
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")
    h.wait(0.2)
    assert h.actions()[-1] == ("signal", "0", 1, "SIGKILL")
    h.exit(0, -9)
    assert h.states(0) == ["running", "stopping", "pending", "running"]
    assert h.store.attempts(0)[0]["reason"] == "hung: no heartbeat for 10s (since the last one)"
    assert h.actions()[-1] == ("start", "0", 2)  # the first restart of a streak: at once


def test_heartbeats_in_time_keep_the_attempt(make: Any) -> None:
    h = make(n=1, heartbeat_timeout_s=3.0)
    h.open()
    for _ in range(20):
        h.wait(2.0)
        h.message(HB, "0", 1)
    assert h.actions() == [("start", "0", 1)]
    assert h.row(0)["heartbeat_at"] == WALL0 + 38.0  # the last beat waits for its flush
    h.wait(PROGRESS_FLUSH_S)
    assert h.row(0)["heartbeat_at"] == WALL0 + 40.0


def test_require_heartbeat_counts_from_the_start(make: Any) -> None:
    h = make(n=1, heartbeat_timeout_s=4.0, require_heartbeat=True)
    h.open()
    h.wait(3.9)
    assert h.actions() == [("start", "0", 1)]
    h.wait(0.2)
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")
    assert h.master.shard_runs[0].life.reason == "hung: no heartbeat for 4s (since start)"


def test_stall_timeout_kills_an_attempt_that_beats_without_progress(make: Any) -> None:
    h = make(n=1, stall_timeout_s=5.0, heartbeat_timeout_s=30.0)
    h.open()
    h.wait(1.0)
    h.message(HB, "0", 1, done=1)
    for _ in range(4):
        h.wait(1.0)
        h.message(HB, "0", 1, done=1)  # alive, but not moving
    h.wait(0.9)  # 5.9 s: the last move was at 1 s
    assert h.actions() == [("start", "0", 1)]
    h.wait(0.2)
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")
    h.exit(0, -15)
    assert h.store.attempts(0)[0]["reason"] == "stalled: no progress for 5s"
    assert h.actions()[-1] == ("start", "0", 2)


def test_memory_over_the_limit_restarts_the_attempt(make: Any) -> None:
    h = make(n=2, max_memory_bytes=1000)
    h.open()
    h.backend.memory = {0: 4000, 1: 10}
    h.wait(1.1)
    assert h.actions() == [("start", "0", 1), ("start", "1", 1), ("signal", "0", 1, "SIGTERM")]
    reason = h.master.shard_runs[0].life.reason
    assert reason is not None and reason.startswith("memory: rss ")
    h.exit(0, -15)
    assert h.store.attempts(0)[0]["reason"] == reason
    assert h.actions()[-1] == ("start", "0", 2)
    assert h.master.shard_runs[1].rss == 10


# --- messages, checkpoints, acks ---


def test_checkpoint_is_committed_before_its_ack_is_sent(make: Any) -> None:
    h = make(n=1)
    h.open()
    seen: list[Any] = []

    def at_reply(msg: proto.Message) -> None:
        reader = Store.open(h.db, readonly=True)
        try:
            seen.append(reader.shard(0)["checkpoint"])  # type: ignore[index]
        finally:
            reader.close()

    h.channel.on_reply = at_reply
    h.trace.clear()
    h.message(CP, "0", 1, seq=7, done=40, checkpoint={"page": 4}, has_checkpoint=True)
    assert h.trace == []  # staged: neither committed nor acknowledged inside the handler
    h.settle()
    assert h.trace == [("commit",), ("reply", "ack", "0", 1, 7)]
    assert seen == [{"page": 4}]  # what the ack confirms was on disk when it left
    assert h.row(0)["checkpoint_done"] == 40


def test_checkpoint_is_where_the_next_attempt_starts(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.message(CP, "0", 1, seq=1, done=40, checkpoint={"page": 4}, has_checkpoint=True)
    h.message(HB, "0", 1, done=45)
    h.exit(0, 1)
    h.wait(1.0)
    spec = h.backend.specs[-1]
    assert spec.attempt == 2
    assert spec.env["ORCH_CHECKPOINT"] == '{"page":4}' and spec.env["ORCH_CHECKPOINT_DONE"] == "40"
    assert h.master.shard_runs[0].done == 40  # progress restarts from the checkpoint
    assert h.row(0)["start_done"] == 40


def test_stale_attempt_message_is_ignored_counted_and_refused(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.exit(0, 1)
    h.wait(1.0)
    assert h.actions()[-1] == ("start", "0", 2)
    h.message(CP, "0", 1, seq=3, done=99, checkpoint="old", has_checkpoint=True)
    h.message(HB, "0", 1, done=99)
    assert ("reply", "nack", "0", 1, 3) in h.trace
    run = h.master.shard_runs[0]
    assert run.checkpoint is None and run.done is None
    assert h.master.status()["dropped"] == {"garbage": 0, "stale": 2}
    h.wait(1.0)  # the tick writes the counters
    assert h.store.counters() == {"dropped_stale": 2}


def test_message_for_an_unknown_shard_counts_as_garbage(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.message(HB, "nope", 1)
    h.channel.garbage = 2  # frames the channel itself could not decode
    assert h.master.status()["dropped"] == {"garbage": 3, "stale": 0}
    h.wait(1.0)
    assert h.store.counters() == {"dropped_garbage": 3}


def test_end_message_flushes_progress_and_is_acked_after_commit(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.trace.clear()
    h.message(proto.Kind.END, "0", 1, seq=9, done=10, total=10)
    assert ("progress", [(10, 10, WALL0, None, 0)]) in h.store.writes
    h.settle()
    assert h.trace == [("commit",), ("reply", "ack", "0", 1, 9)]


def test_progress_is_flushed_in_one_batch_every_half_second(make: Any) -> None:
    h = make(n=2)
    h.open()
    h.wait(0.1)
    h.message(HB, "0", 1, done=3, total=10)
    h.wait(0.1)
    h.message(HB, "1", 1, done=7)
    h.message(HB, "0", 1, done=4)
    h.wait(PROGRESS_FLUSH_S - 0.11)  # 0.59 s: the first report came at 0.1 s
    progress = [w for w in h.store.writes if w[0] == "progress"]
    assert progress == []
    h.wait(0.02)
    progress = [w for w in h.store.writes if w[0] == "progress"]
    assert progress == [
        ("progress", [(4, 10, WALL0 + 0.2, None, 0), (7, None, WALL0 + 0.2, None, 1)])
    ]
    assert h.master.items() == (11, None)  # shard 1 has no total yet


def test_stdout_protocol_lines_report_progress_and_checkpoints(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.backend.output(0, Stream.STDOUT, b'hello\n##orch {"done": 5, "total": 10}\n')
    h.backend.output(0, Stream.STDOUT, b'##orch {"advance": 2, "checkpoint": [1]}\n##orch bad\n')
    run = h.master.shard_runs[0]
    assert (run.done, run.total, run.checkpoint, run.checkpoint_done) == (7, 10, [1], 7)
    h.backend.output(0, Stream.STDOUT, b'##orch {"done": 9}')  # no newline: counted at exit
    h.exit(0, 0)
    assert run.done == 9 and h.row(0)["done"] == 9
    assert h.store.counters() == {"bad_stdout_lines": 1}


# --- stopping, signals ---


def test_stop_during_backoff_stops_the_shard_and_cancels_the_timer(make: Any) -> None:
    h = make(n=1, backoff_initial_s=5.0)
    h.open()
    h.exit(0, 1)  # restarted at once
    h.exit(0, 1)  # then backs off
    assert h.timer(0, TimerKind.BACKOFF) == pytest.approx(5.0)
    h.master.stop_shard(0)
    h.settle()
    assert h.states(0) == ["running", "pending", "running", "backoff", "stopped"]
    assert h.row(0)["reason"] == "stopped by user"
    assert h.loop.timers.at((0, TimerKind.BACKOFF)) is None
    h.wait(10.0)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2)]
    assert h.master.run_state() == "stopped" and h.close() == RET_FAILED


def test_stop_all_stops_running_and_queued_shards(make: Any) -> None:
    h = make(n=3, jobs=1)
    h.open()
    h.master.stop_all()
    h.settle()
    assert h.actions() == [("start", "0", 1), ("signal", "0", 1, "SIGTERM")]
    assert [h.row(i)["state"] for i in range(3)] == ["stopping", "stopped", "stopped"]
    h.exit(0, -15)
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")  # nothing new starts
    assert h.master.finished and h.master.run_state() == "stopped"
    assert h.master.exit_code() == RET_FAILED


def test_sigint_stops_everything_and_exits_130(make: Any) -> None:
    h = make(n=2, jobs=1, stop_timeout_s=3.0)
    h.open()
    h.loop.post_signal(signal.SIGINT)
    h.settle()
    assert h.actions() == [("start", "0", 1), ("signal", "0", 1, "SIGTERM")]
    assert h.view.events[0] == "SIGINT: stopping every shard (SIGTERM, then SIGKILL after 3s)"
    assert h.row(1)["reason"] == "stopped: orch is shutting down"
    h.exit(0, -15)
    assert h.states(0) == ["running", "stopping", "stopped"]
    assert h.view.events == [h.view.events[0]]  # a shard stopped on purpose is no failure
    assert h.close() == RET_INTERRUPTED
    assert h.events.published[-1] == {"run": "stopped", "exit_code": RET_INTERRUPTED}


def test_second_sigint_kills_every_group_at_once(make: Any) -> None:
    h = make(n=2)
    h.open()
    h.loop.post_signal(signal.SIGINT)
    h.settle()
    h.loop.post_signal(signal.SIGINT)
    h.settle()
    assert h.actions()[-3:] == [
        ("signal", "0", 1, "SIGTERM"),
        ("signal", "1", 1, "SIGTERM"),
        ("kill_all",),
    ]
    assert h.view.events[-1] == "second interrupt: killing every shard now"


def test_sigterm_exit_code_is_128_plus_15(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.loop.post_signal(signal.SIGTERM)
    h.settle()
    h.exit(0, 0)  # it finished its work while stopping: still stopped by orch
    assert h.row(0)["state"] == "stopped"
    assert h.close() == 128 + signal.SIGTERM


def test_sigchld_asks_the_backend_to_reap(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.loop.post_signal(signal.SIGCHLD)
    h.settle()
    assert ("reap",) in h.trace


def test_grace_timer_after_an_exit_does_nothing(make: Any) -> None:
    h = make(n=1, stop_timeout_s=2.0)
    h.open()
    h.master.stop_shard(0)
    h.settle()
    h.exit(0, -15)
    h.wait(5.0)
    assert h.actions() == [("start", "0", 1), ("signal", "0", 1, "SIGTERM")]


# --- dispatch: --jobs, scale, restart ---


def test_jobs_is_never_exceeded(make: Any) -> None:
    h = make(n=5, jobs=2, backoff_initial_s=1.0)
    h.open()
    failed_once = False
    for _ in range(20):
        assert h.master.running == len(h.backend.running) <= 2
        if h.master.finished:
            break
        if not h.backend.running:
            h.wait(0.5)  # only a backoff is left
            continue
        idx = min(h.backend.running)
        code = 1 if idx == 2 and not failed_once else 0
        failed_once = failed_once or code == 1
        h.exit(idx, code)
    assert h.master.finished and h.master.run_state() == "done"
    assert h.actions() == [
        ("start", "0", 1),
        ("start", "1", 1),
        ("start", "2", 1),
        ("start", "3", 1),
        ("start", "4", 1),
        ("start", "2", 2),
    ]


def test_scale_up_mid_dispatch_starts_the_next_shards_at_once(make: Any) -> None:
    h = make(n=4, jobs=1)
    h.open()
    assert h.actions() == [("start", "0", 1)]
    h.master.scale(3)
    assert h.actions() == [("start", "0", 1), ("start", "1", 1), ("start", "2", 1)]
    h.settle()
    assert h.store.run()["jobs"] == 3


def test_scale_down_stops_the_newest_surplus_back_to_pending_and_resumes_them_first(
    make: Any,
) -> None:
    h = make(n=5, jobs=3)
    h.open()
    h.wait(1.0)
    h.exit(1, 0)  # shard 3 starts a second later: the newest
    assert h.actions()[-1] == ("start", "3", 1)
    h.message(CP, "3", 1, seq=1, done=7, checkpoint={"page": 7}, has_checkpoint=True)
    h.settle()
    h.master.scale(1)
    h.settle()
    # The newest first, SIGTERM then a grace like a stop; the oldest keeps running.
    assert h.actions()[-2:] == [("signal", "3", 1, "SIGTERM"), ("signal", "2", 1, "SIGTERM")]
    assert h.timer(3, TimerKind.GRACE) == pytest.approx(1.0 + 10.0)
    h.exit(3, -15)
    h.exit(2, -15)
    assert h.states(3) == ["running", "stopping", "pending"]  # not failed, not backoff
    assert h.row(3)["reason"] == "scaled down: waiting for a slot"
    assert h.master.counts() == {"done": 1, "running": 1, "pending": 3}
    assert h.actions()[-1] == ("signal", "2", 1, "SIGTERM")  # no slot: nothing starts
    assert h.store.run()["jobs"] == 1
    h.exit(0, 0)  # the slot frees: the scaled-down shards resume before shard 4, queued since
    h.exit(2, 0)
    h.exit(3, 0)
    assert [a[1:] for a in h.actions() if a[0] == "start"][-3:] == [("2", 2), ("3", 2), ("4", 1)]
    spec3 = h.backend.specs[-2]
    assert spec3.env["ORCH_CHECKPOINT"] == '{"page":7}'  # it resumes from its checkpoint
    assert h.master.shard_runs[3].life.failures == 0  # a scale-down is no failure


def test_scale_down_to_the_running_count_or_above_stops_nothing(make: Any) -> None:
    h = make(n=4, jobs=3)
    h.open()
    h.master.scale(3)
    h.master.scale(5)
    h.settle()
    assert [a[0] for a in h.actions()] == ["start"] * 4  # scaling up started shard 3


def test_restart_shard_puts_it_at_the_front_of_the_queue(make: Any) -> None:
    h = make(n=3, jobs=1)
    h.open()
    h.exit(0, 0)
    assert h.actions()[-1] == ("start", "1", 1)
    h.master.restart_shard(0)  # done, restarted: ahead of shard 2, which waits since the start
    h.settle()
    h.exit(1, 0)
    h.exit(0, 0)
    assert h.actions() == [
        ("start", "0", 1),
        ("start", "1", 1),
        ("start", "0", 2),
        ("start", "2", 1),
    ]
    assert h.store.shard(0)["reason"] == "exit 0"  # type: ignore[index]


def test_restart_of_a_running_shard_starts_a_fresh_attempt_without_backoff(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.master.restart_shard(0)
    h.settle()
    assert h.actions()[-1] == ("signal", "0", 1, "SIGTERM")
    h.exit(0, -15)
    assert h.actions()[-1] == ("start", "0", 2)
    assert h.states(0) == ["running", "stopping", "pending", "running"]


# --- starting: spawn failures, resume ---


def test_spawn_failure_ends_the_shard_failed_and_siblings_go_on(make: Any) -> None:
    h = make(n=2, jobs=1)
    h.backend.fail[0] = SpawnError("executable not found: 'work'")
    h.open()
    assert h.actions() == [("start", "0", 1), ("start", "1", 1)]
    row = h.row(0)
    assert (row["state"], row["reason"]) == ("failed", "cannot start: executable not found: 'work'")
    (attempt,) = h.store.attempts(0)
    assert attempt["pid"] is None and attempt["started_at"] == attempt["ended_at"] == WALL0
    assert attempt["reason"] == "cannot start: executable not found: 'work'"
    h.exit(1, 0)
    assert h.master.run_state() == "failed"


def test_transient_spawn_failure_is_retried_with_backoff(make: Any) -> None:
    h = make(n=1, backoff_initial_s=1.0)
    h.backend.fail[0] = SpawnError("out of resources: EMFILE", transient=True)
    h.open()  # the first failure retries at once, the second backs off
    assert h.row(0)["state"] == "backoff"
    del h.backend.fail[0]
    h.wait(1.0)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2), ("start", "0", 3)]
    assert h.row(0)["state"] == "running"


def _earlier_run(store: Store) -> None:
    """Shard 0 done, 1 stopped at attempt 2 with a checkpoint, 2 failed, 3 running (lost)."""
    for idx, state, attempts in (
        (0, "done", 1),
        (1, "stopped", 2),
        (2, "failed", 6),
        (3, "running", 1),
    ):
        for n in range(1, attempts + 1):
            store.attempt_started(idx, n, pid=None, pgid=None, create_time=None, started_at=1.0)
        store.set_shard(idx, state=state, attempts=attempts, done=5, total=10)
    store.set_shard(1, checkpoint={"at": 3}, checkpoint_done=3)


def test_resume_restarts_stopped_and_lost_shards_from_their_checkpoints(make: Any) -> None:
    h = make(n=4, prepare=_earlier_run)
    h.open()
    assert h.actions() == [("start", "1", 3), ("start", "3", 2)]
    assert h.backend.specs[0].env["ORCH_CHECKPOINT"] == '{"at":3}'
    assert [h.row(i)["state"] for i in range(4)] == ["done", "running", "failed", "running"]
    assert h.master.items() == (5 + 3 + 5 + 0, 40)


def test_resume_with_retry_failed_restarts_failed_shards_too(make: Any) -> None:
    h = make(n=4, prepare=_earlier_run, retry_failed=True)
    h.open()
    assert h.actions() == [("start", "1", 3), ("start", "2", 7), ("start", "3", 2)]


def test_resume_without_reattach_never_asks_the_backend(make: Any) -> None:
    h = make(n=4, prepare=_earlier_run)
    h.backend.alive = {3: 1}
    h.open()
    assert not [t for t in h.trace if t[0] == "reattach"]
    assert h.actions() == [("start", "1", 3), ("start", "3", 2)]


def test_resume_takes_back_an_attempt_still_alive_without_a_new_one(make: Any) -> None:
    h = make(n=4, prepare=_earlier_run, reattach=True)
    h.backend.alive = {3: 1}  # shard 3's attempt 1 outlived its master; shard 1's did not
    h.open()
    assert [t for t in h.trace if t[0] == "reattach"] == [
        ("reattach", "1", 2),
        ("reattach", "3", 1),
    ]
    assert h.actions() == [("start", "1", 3)]
    assert h.states(3) == ["pending", "running"]
    row = h.row(3)
    assert (row["state"], row["attempts"], row["ended_at"]) == ("running", 1, None)
    assert [(a["attempt"], a["ended_at"]) for a in h.store.attempts(3)] == [(1, None)]
    assert h.master.running == 2
    h.backend.place(3, "node-b")
    h.settle()
    assert h.row(3)["node"] == "node-b"
    assert h.master.shard_runs[3].node == "node-b"
    h.exit(3, 0)
    assert h.row(3)["state"] == "done"
    assert h.actions() == [("start", "1", 3)]  # the taken-back attempt was the only one


# --- a node is lost (backends with nodes) ---


def test_an_attempt_waiting_for_a_node_says_so_until_it_is_placed(make: Any) -> None:
    """What the backend says while the attempt waits for room is the shard's message (the
    REASON of orch status) until it is placed, or ends without ever being placed."""
    h = make(n=2, jobs=2)
    h.open()
    why = "waiting for a node with CPU 2 free (2 alive nodes, all taken by this run)"
    h.backend.queue(1, why)
    h.settle()
    assert (h.row(0)["message"], h.row(1)["message"]) == (None, why)
    h.backend.place(1, "node-b")
    h.settle()
    assert (h.row(1)["node"], h.row(1)["message"]) == ("node-b", None)
    h.backend.queue(0, why)
    h.settle()
    assert h.row(0)["message"] == why
    h.exit(0, 1)  # it never left the queue: the message goes with it
    h.settle()
    assert h.row(0)["message"] is None


def test_lost_attempts_are_re_placed_without_counting_against_max_restarts(make: Any) -> None:
    h = make(n=1, max_restarts=0, backoff_initial_s=1.0)
    h.open()
    h.backend.place(0, "node-a")
    h.settle()
    assert h.row(0)["node"] == "node-a"
    h.wait(2.0)
    h.lose(0, "node-a")
    assert h.states(0) == ["running", "pending", "running"]  # first restart: at once
    assert h.actions() == [("start", "0", 1), ("start", "0", 2)]
    assert h.row(0)["last_error"] == "node lost: node-a"
    first = h.store.attempts(0)[0]
    assert (first["signal"], first["reason"]) == (9, "node lost: node-a")
    assert h.view.events == ["shard 0 attempt 1: node lost: node-a"]
    h.wait(0.5)
    h.lose(0, "node-b")  # lost again: still not the shard's fault, with the usual backoff
    assert h.states(0)[-1] == "backoff"
    assert h.row(0)["reason"] == "node lost: node-b"
    assert h.timer(0, TimerKind.BACKOFF) == pytest.approx(2.5 + 1.0)
    h.wait(1.0)
    assert h.actions() == [("start", "0", 1), ("start", "0", 2), ("start", "0", 3)]
    assert h.row(0)["state"] == "running"
    h.exit(0, 1)  # a real failure counts: max_restarts = 0 gives up at once
    assert h.row(0)["state"] == "failed"
    assert h.row(0)["reason"] == "gave up after 3 attempts (last: exit 1)"


def test_lost_while_stopping_ends_the_shard_stopped(make: Any) -> None:
    h = make(n=1)
    h.open()
    h.master.stop_shard(0)
    h.settle()
    assert h.actions() == [("start", "0", 1), ("signal", "0", 1, "SIGTERM")]
    h.lose(0, "node-a")
    assert h.states(0) == ["running", "stopping", "stopped"]
    assert h.loop.timers.at((0, TimerKind.GRACE)) is None
    assert h.actions() == [("start", "0", 1), ("signal", "0", 1, "SIGTERM")]


# --- the whole run ---


def test_run_drives_every_shard_to_the_end_on_the_fake_clock(make: Any) -> None:
    h = make(n=3, jobs=2)
    backend = h.backend
    plain_start = backend.start

    def start_and_finish_in_2s(spec: AttemptSpec) -> AttemptHandle:
        handle = plain_start(spec)
        h.loop.timers.set(
            ("exit", spec.index), h.clock() + 2.0, lambda: backend.exit(spec.index, 0)
        )
        return handle

    backend.start = start_and_finish_in_2s  # type: ignore[method-assign]
    assert h.master.run() == RET_OK
    h.closed = True
    assert h.clock.now == pytest.approx(T0 + 4.0)
    assert h.actions() == [("start", "0", 1), ("start", "1", 1), ("start", "2", 1)]
    run = h.store.run()
    assert (run["state"], run["exit_code"], run["ended_at"]) == (
        "done",
        0,
        pytest.approx(WALL0 + 4.0),
    )
    published = h.events.published
    assert [(e["shard"], e["from"], e["state"]) for e in published if "shard" in e] == [
        ("0", "pending", "running"),
        ("1", "pending", "running"),
        ("0", "running", "done"),
        ("1", "running", "done"),
        ("2", "pending", "running"),
        ("2", "running", "done"),
    ]
    assert published[-1] == {"run": "done", "exit_code": 0} and h.events.closed


def test_run_state_and_exit_code_while_running_and_when_mixed(make: Any) -> None:
    h = make(n=2, restart=Restart.NEVER)
    h.open()
    assert (h.master.run_state(), h.master.counts()) == ("running", {"running": 2})
    h.exit(0, 0)
    h.exit(1, 4)
    assert h.master.counts() == {"done": 1, "failed": 1}
    assert (h.master.run_state(), h.master.exit_code()) == ("failed", RET_FAILED)
    assert h.master.status()["counts"] == {"done": 1, "failed": 1}


# --- failure policy: final exit codes, max_failed --------------------------------------


def test_final_exit_code_fails_the_shard_at_once_and_siblings_go_on(make: Any) -> None:
    h = make(n=2, jobs=1, final_exit_codes=(4, 44))
    h.open()
    h.exit(0, 44)
    assert h.states(0) == ["running", "failed"]
    assert h.timer(0, TimerKind.BACKOFF) is None
    assert h.row(0)["reason"] == "exit 44 (a final exit code)"
    assert h.actions() == [("start", "0", 1), ("start", "1", 1)]
    h.exit(1, 3)  # any other code: the usual restart (the first of a streak at once)
    assert h.states(1) == ["running", "pending", "running"]


def test_max_failed_stops_the_rest_and_the_run_ends_failed(make: Any) -> None:
    h = make(n=5, jobs=2, restart=Restart.NEVER, max_failed=1)
    h.open()
    h.exit(0, 1)  # one failed: not more than 1
    assert h.actions()[-1] == ("start", "2", 1)
    h.exit(1, 1)  # two failed: more than max_failed
    assert h.actions()[-1] == ("signal", "2", 1, "SIGTERM")
    assert h.timer(2, TimerKind.GRACE) == pytest.approx(10.0)
    assert [h.row(i)["state"] for i in range(5)] == [
        "failed",
        "failed",
        "stopping",
        "stopped",
        "stopped",
    ]
    assert h.row(3)["reason"] == "stopped: more shards failed than max_failed allows"
    assert any("max_failed 1" in e for e in h.view.events)
    h.exit(2, -15)
    starts = [a for a in h.actions() if a[0] == "start"]
    assert starts == [("start", "0", 1), ("start", "1", 1), ("start", "2", 1)]  # 3, 4 never
    assert h.master.finished
    assert (h.master.run_state(), h.close()) == ("failed", RET_FAILED)
    assert h.store.run()["state"] == "failed"


def test_max_failed_zero_stops_at_the_first_failure(make: Any) -> None:
    h = make(n=3, jobs=3, final_exit_codes=(4,), max_failed=0)
    h.open()
    h.exit(1, 4)
    assert sorted(a[1] for a in h.actions() if a[0] == "signal") == ["0", "2"]


def test_failures_up_to_max_failed_let_the_run_go_on(make: Any) -> None:
    h = make(n=3, jobs=1, restart=Restart.NEVER, max_failed=2)
    h.open()
    h.exit(0, 1)
    h.exit(1, 1)
    h.exit(2, 0)
    assert [a[0] for a in h.actions()] == ["start"] * 3
    assert h.master.counts() == {"failed": 2, "done": 1}


# --- restarting every shard, rolling ------------------------------------------------------


def test_restart_without_a_shard_restarts_every_running_shard_at_once(make: Any) -> None:
    h = make(n=4, jobs=3)
    h.open()
    assert h.master.restart_all() == 3
    h.settle()
    assert [a for a in h.actions() if a[0] == "signal"] == [
        ("signal", "0", 1, "SIGTERM"),
        ("signal", "1", 1, "SIGTERM"),
        ("signal", "2", 1, "SIGTERM"),
    ]
    for i in range(3):
        h.exit(i, -15)
    starts = [a[1:] for a in h.actions() if a[0] == "start"]
    assert starts[-3:] == [("0", 2), ("1", 2), ("2", 2)]  # each as soon as it is gone
    assert h.master.counts() == {"running": 3, "pending": 1}


def test_rolling_restart_restarts_k_at_a_time_each_next_once_one_runs_again(make: Any) -> None:
    h = make(n=3, jobs=3)
    h.open()
    h.trace.clear()
    assert h.master.restart_all(rolling=1) == 3
    h.settle()
    assert h.actions() == [("signal", "0", 1, "SIGTERM")]
    h.wait(5.0)  # shard 1 waits while shard 0 is still stopping
    assert h.actions() == [("signal", "0", 1, "SIGTERM")]
    h.exit(0, -15)  # 0 is running again: now 1
    assert h.actions() == [
        ("signal", "0", 1, "SIGTERM"),
        ("start", "0", 2),
        ("signal", "1", 1, "SIGTERM"),
    ]
    h.exit(1, -15)
    h.exit(2, -15)
    assert h.actions()[3:] == [
        ("start", "1", 2),
        ("signal", "2", 1, "SIGTERM"),
        ("start", "2", 2),
    ]
    assert h.master.counts() == {"running": 3}


def test_rolling_restart_with_k_2_and_a_shard_that_ends_meanwhile(make: Any) -> None:
    h = make(n=4, jobs=4)
    h.open()
    h.trace.clear()
    h.master.restart_all(rolling=2)
    h.settle()
    assert h.actions() == [("signal", "0", 1, "SIGTERM"), ("signal", "1", 1, "SIGTERM")]
    h.exit(2, 0)  # shard 2 ends done before its turn: it is skipped
    h.exit(0, -15)
    assert h.actions()[2:] == [("start", "0", 2), ("signal", "3", 1, "SIGTERM")]
    assert h.row(2)["state"] == "done"


# --- a notifier among the sinks -------------------------------------------------------------


def test_notifier_rows_go_out_in_the_commit_of_their_state_change(make: Any) -> None:
    from orchestrator.notify.notifier import Notifier, store_facts
    from orchestrator.notify.sink import NotifySink
    from orchestrator.notifyconfig import Channel, Kind
    from orchestrator.ports import FanOut

    h = make(n=2, jobs=2, restart=Restart.NEVER)
    launched: list[int] = []

    def launch() -> None:
        h.trace.append(("launch",))
        launched.append(len(outbox(h.db)))

    channel = Channel(name="ops", kind=Kind.WEBHOOK, url="http://127.0.0.1:9/hook")
    notifier = Notifier(
        h.store, [channel], lambda: store_facts(h.store), wall=h.clock.wall, launch=launch
    )
    h.master.events = FanOut([h.events, NotifySink(notifier)])
    h.open()
    h.trace.clear()
    h.exit(0, 3)  # gave up: a row staged with the failure, committed with it, then launched
    assert h.trace[-2:] == [("commit",), ("launch",)]
    assert launched == [1]
    assert [(r[0], r[1]) for r in outbox(h.db)] == [("ops", "gave_up")]
    h.exit(1, 0)
    h.trace.clear()
    assert h.close() == RET_FAILED
    commits = [t for t in h.trace if t[0] in ("commit", "launch")]
    assert commits == [("commit",), ("launch",)]  # the end's row, in the end's commit
    rows = outbox(h.db)
    assert [(r[0], r[1]) for r in rows] == [("ops", "gave_up"), ("ops", "failed")]
    assert rows[1][2]["state"] == "failed" and rows[1][2]["failed_count"] == 1
    assert launched == [1, 2]


def outbox(db: str) -> list[tuple[str, str, dict[str, Any]]]:
    import sqlite3

    import orjson

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        got = conn.execute("SELECT channel, event, body FROM outbox ORDER BY id").fetchall()
    finally:
        conn.close()
    return [(c, e, orjson.loads(b)) for c, e, b in got]


# --- many shards: a shard never started costs no ShardRun -----------------------------------


def test_a_shard_gets_its_shard_run_when_dispatched_not_before(make: Any) -> None:
    h = make(n=1000, jobs=2)
    h.open()
    runs = h.master.shard_runs
    assert [r.index for r in runs.made()] == [0, 1]
    assert runs.unmade == 998 and len(runs) == 1000
    assert h.master.items() == (0, None)  # shards never started have reported no total
    h.exit(0, 0)
    assert h.actions()[-1] == ("start", "2", 1)
    assert [r.index for r in runs.made()] == [0, 1, 2]
    assert runs.unmade == 997
    assert runs[999].life.state.value == "pending" and runs.unmade == 996  # made when asked
    assert h.master.shard_index("999") == 999 and h.master.shard_index("1000") is None


def test_a_message_for_a_shard_never_started_is_stale_and_a_finished_one_leaves_the_cache(
    make: Any,
) -> None:
    h = make(n=5, jobs=1)
    h.open()
    h.message(HB, "3", 1)  # shard 3 has had no attempt 1
    assert h.master.status()["dropped"] == {"garbage": 0, "stale": 1}
    h.message(HB, "0", 1, done=2)
    assert set(h.master.shard_runs.cached) == {"0"}  # the running shard, looked up once
    h.exit(0, 0)
    assert "0" not in h.master.shard_runs.cached  # done: no longer in the heartbeat cache
    beat = h.master.tracker.on_heartbeat
    beat(b"peer", ("0", 2, 3, None, None), h.loop.clock())  # found without the cache
    assert h.master.status()["dropped"] == {"garbage": 0, "stale": 2}
    assert "0" not in h.master.shard_runs.cached
    beat(b"peer", ("1", 1, 4, 8, 100), h.loop.clock())  # the next shard, now running
    assert h.master.shard_runs[1].done == 4 and h.master.shard_runs[1].rss == 100
    assert set(h.master.shard_runs.cached) == {"1"}
    beat(b"peer", ("nope", 1, 4, 8, 100), h.loop.clock())
    assert h.master.status()["dropped"] == {"garbage": 1, "stale": 2}


def test_resumed_shards_with_a_past_are_made_at_load_the_others_when_dispatched(
    make: Any,
) -> None:
    h = make(n=6, jobs=2, prepare=_earlier_run)
    h.open()
    assert [r.index for r in h.master.shard_runs.made()] == [0, 1, 2, 3]
    assert h.actions() == [("start", "1", 3), ("start", "3", 2)]
    h.exit(1, 0)
    assert h.actions()[-1] == ("start", "4", 1)  # then the fresh ones, in shard order
    assert h.master.counts() == {"done": 2, "failed": 1, "running": 2, "pending": 1}
