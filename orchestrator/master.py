"""The master: one process, one thread, one loop that owns every shard's state.

The master turns what happens (a slot frees, a child exits, a heartbeat or
a protocol line arrives, a timer fires, a signal or control request comes
in) into lifecycle events, runs them through ``lifecycle.step`` and carries
out the actions it returns: spawn through the backend, signal a process
group, set or cancel a timer. Every state change is staged in the store and
committed at the end of the loop iteration (group commit), before any reply
that depends on it (checkpoint acks) goes out.

The master owns the loop, the ready queue, dispatch, the group commit and
the signals. Each shard is a ``ShardRun``; starting attempts and hearing
them end is ``Attempts``, what they report is ``Tracker``. Everything it
reaches the world through arrives in ``Ports`` (see orchestrator.assemble).
"""

from __future__ import annotations

import os
import signal
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from orchestrator import lifecycle as lc
from orchestrator import procfs
from orchestrator.attempts import Attempts
from orchestrator.backends import AttemptHandle, Stream
from orchestrator.config import TaskConfig
from orchestrator.errors import RET_FAILED, RET_INTERRUPTED, RET_OK
from orchestrator.lifecycle import Intent, State
from orchestrator.loop import raise_fd_limit
from orchestrator.ports import FanOut, Ports
from orchestrator.progress import MEMORY_CHECK_S, Tracker
from orchestrator.shard import ShardRun
from orchestrator.sources import ShardList
from orchestrator.store import Store, StoreUnwritable
from orchestrator.template import compile_command

__all__ = ["DEFAULT_MAX_JOBS", "FDS_PER_ATTEMPT", "Master", "View", "default_jobs"]

#: Default ceiling on children alive at once when --jobs is not given.
DEFAULT_MAX_JOBS = 1000
#: File descriptors one live attempt costs the master: two pipes, two log files.
FDS_PER_ATTEMPT = 4


def default_jobs(count: int, requested: int | None) -> int:
    """--jobs, or one per shard within what the open-files limit allows (raised first)."""
    if requested is not None:
        return requested
    fd_cap = max(1, (raise_fd_limit() - 64) // FDS_PER_ATTEMPT)
    return max(1, min(count, DEFAULT_MAX_JOBS, fd_cap))


class View:
    """What the master tells the person watching; the base class says nothing."""

    def started(self, master: Master) -> None: ...
    def event(self, text: str) -> None: ...
    def line(self, shard_id: str, stream: Stream, data: bytes) -> None: ...
    def tick(self, master: Master) -> None: ...
    def finished(self, master: Master) -> None: ...

    verbose = False
    tick_s = 1.0


#: How long state writes the disk refuses are retried before the run is stopped.
STORE_RETRY_S = 10.0
#: Delay between those retries: doubling from the first, up to the last.
STORE_RETRY_DELAYS_S = (0.1, 2.0)


class Master:
    def __init__(
        self,
        *,
        run_id: str,
        run_dir: str,
        task: TaskConfig,
        shards: ShardList,
        store: Store,
        ports: Ports,
        jobs: int,
        view: View | None = None,
        retry_failed: bool = False,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.task = task
        self.shards = shards
        self.store = store
        self.ports = ports
        self.loop = ports.loop
        self.backend = ports.backend
        self.channel = ports.channel
        # A FanOut carries the recording sinks' calls (ending, committed, tick) too.
        self.events = ports.events if isinstance(ports.events, FanOut) else FanOut([ports.events])
        self.view = view or View()
        self.jobs = jobs
        self.retry_failed = retry_failed
        self.policy = lc.Policy.from_task(task)
        self.shard_runs: list[ShardRun] = []  # by index, like the store and the shard list
        self._by_id: dict[str, ShardRun] = {}
        self.ready: deque[ShardRun] = deque()
        #: Shards a user restarted: "a new attempt now" puts them at the front of the queue.
        self._restarted: set[ShardRun] = set()
        self.running = 0  # shards holding a slot (running or stopping)
        self._unfinished = 0
        self._counts: Counter[str] = Counter()
        self.interrupted: int | None = None
        #: Set when the run's state could not be saved for STORE_RETRY_S: the run stops.
        self.store_error: str | None = None
        self._store_failing_since: float | None = None
        self._store_retry_s = STORE_RETRY_DELAYS_S[0]
        #: Set once more shards failed than max_failed allows: the rest are stopped.
        self.aborted = False
        #: A rolling restart: shards still to restart, and those restarted not running yet.
        self._rolling: deque[ShardRun] = deque()
        self._rolling_out: set[ShardRun] = set()
        self._rolling_k = 0
        self.tracker = Tracker(
            loop=self.loop,
            store=store,
            by_id=self._by_id,
            backend=self.backend,
            channel=self.channel,
            view=self.view,
            wall=ports.wall,
            apply=self.apply,
            commit=self._commit,
            max_memory_bytes=task.max_memory_bytes,
        )
        self.attempts = Attempts(
            run_id=run_id,
            run_dir=run_dir,
            task=task,
            template=compile_command(task),
            shards=shards,
            loop=self.loop,
            store=store,
            backend=self.backend,
            channel=self.channel,
            guardian=ports.guardian,
            view=self.view,
            wall=ports.wall,
            tracker=self.tracker,
            apply=self.apply,
            interrupted=lambda: self.interrupted is not None,
            environ=base_env,
        )
        self.backend.bind(self)
        self.channel.bind(self.tracker.on_message)
        ports.control.bind(self)

    # --- running ------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until every shard is terminal; return the run's exit code."""
        self.open()
        try:
            while not self.finished:
                self.loop.run_once()
        finally:
            code = self.close()
        self.view.finished(self)
        return code

    @property
    def finished(self) -> bool:
        return self._unfinished == 0 and self.running == 0

    def open(self) -> None:
        """Take the shards over from the store, record the run as running, start dispatch."""
        self._load()
        loop, ports = self.loop, self.ports
        loop.handle_signals(
            {
                signal.SIGCHLD: self.handle_sigchld,
                signal.SIGINT: self.handle_sigint,
                signal.SIGTERM: self.handle_sigterm,
                signal.SIGHUP: self.handle_sigterm,
            }
        )
        self.store.set_run(
            state="running",
            master_pid=os.getpid(),
            master_create_time=procfs.start_time(os.getpid()),
            endpoint=ports.channel.endpoint,
            control=ports.control.endpoint,
            jobs=self.jobs,
            exit_code=None,
            ended_at=None,
        )
        self.store.commit()
        if ports.reattach:
            # Attempts a previous master left alive (a Ray actor survives its master)
            # are taken back before anything is scheduled.
            for run in list(self.ready):
                self.attempts.reattach(run)
        self.view.started(self)
        loop.timers.set("tick", loop.clock() + self.view.tick_s, self._tick)
        self._sinks_tick()
        if self.task.max_memory_bytes is not None:
            loop.timers.set("memory", loop.clock() + MEMORY_CHECK_S, self._check_memory)
        self._schedule()

    def _load(self) -> None:
        """One ``ShardRun`` per stored shard: fresh runs and resumed ones alike."""
        pending = State.PENDING.value
        for row in self.store.resume_rows():
            run = ShardRun.from_row(row, self.retry_failed)
            self.shard_runs.append(run)
            self._by_id[run.id] = run
            self._counts[run.life.state.value] += 1
            if not run.life.state.terminal:
                self._unfinished += 1
                self.ready.append(run)
                if row[2] != pending:
                    self.store.set_shard(run.index, state=pending, pid=None)

    def close(self) -> int:
        """Record how the run ended, close every port; return the run's exit code."""
        ports = self.ports
        self.tracker.flush_progress()
        code = self.exit_code()
        self.store.set_run(state=self.run_state(), exit_code=code, ended_at=ports.wall())
        self.tracker.flush_counters()
        end = {"run": self.run_state(), "exit_code": code}
        self.events.ending(end)  # a notifier stages its rows in the commit that records the end
        try:
            self.store.commit()
        except StoreUnwritable as exc:
            # The run stays "running" in the database, its master gone: `lost`,
            # which `orch resume` finishes once the disk has room again.
            self._give_up_store(exc)
            code = self.exit_code()
            end = {"run": self.run_state(), "exit_code": code}
        else:
            self.events.committed()
        self.events.publish(end)
        ports.control.close()
        self.events.close()
        self.channel.close()
        self.backend.close()
        ports.guardian.close(clean=not self.backend.live())
        self.loop.close()
        return code

    # --- what the backend reports (the channel's messages go to the tracker) ---------------

    def on_output(self, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        self.attempts.output(self.shard_runs[handle.spec.index], handle, stream, data)

    def on_exit(self, handle: AttemptHandle, code: int) -> None:
        self.attempts.exited(self.shard_runs[handle.spec.index], handle, code)

    def on_node(self, handle: AttemptHandle, node: str) -> None:
        self.attempts.placed(self.shard_runs[handle.spec.index], handle, node)
        self.loop.call_when_idle(self._commit)

    def on_lost(self, handle: AttemptHandle, reason: str) -> None:
        self.attempts.exited(self.shard_runs[handle.spec.index], handle, -signal.SIGKILL, reason)

    # --- signals ------------------------------------------------------------------

    def handle_sigchld(self, signum: int) -> None:
        self.backend.reap()

    def handle_sigint(self, signum: int) -> None:
        self._interrupt(signum)

    def handle_sigterm(self, signum: int) -> None:
        self._interrupt(signum)

    def _interrupt(self, signum: int) -> None:
        if self.interrupted is not None:
            self.view.event("second interrupt: killing every shard now")
            self.backend.kill_all()
            return
        self.interrupted = signum
        self.view.event(
            f"{signal.Signals(signum).name}: stopping every shard "
            f"(SIGTERM, then SIGKILL after {self.task.stop_timeout_s:g}s)"
        )
        self.stop_all(Intent.SHUTDOWN)

    # --- steering (the control port) ------------------------------------------------

    def shard_index(self, shard_id: str) -> int | None:
        run = self._by_id.get(shard_id)
        return run.index if run is not None else None

    def stop_all(self, intent: Intent = Intent.STOP) -> None:
        self.ready.clear()
        for run in self.shard_runs:
            self.apply(run, lc.StopRequested(intent))

    def stop_shard(self, idx: int) -> None:
        run = self.shard_runs[idx]
        self._restarted.discard(run)
        self.apply(run, lc.StopRequested(Intent.STOP))

    def restart_shard(self, idx: int) -> None:
        run = self.shard_runs[idx]
        self._restarted.add(run)
        self.apply(run, lc.RestartRequested())

    def restart_all(self, rolling: int | None = None) -> int:
        """Restart every running shard; with ``rolling`` K, at most K at a time, the next
        one once a restarted one is running again. Returns how many will be restarted."""
        live = [r for r in self.shard_runs if r.life.state is State.RUNNING]
        if rolling is None:
            for run in live:
                self.restart_shard(run.index)
            return len(live)
        self._rolling = deque(live)
        self._rolling_out.clear()
        self._rolling_k = rolling
        self._roll()
        return len(live)

    def _roll(self) -> None:
        while self._rolling and len(self._rolling_out) < self._rolling_k:
            run = self._rolling.popleft()
            if run.life.state is not State.RUNNING:
                continue  # ended or stopped meanwhile: nothing to restart
            self._rolling_out.add(run)
            self.restart_shard(run.index)

    def scale(self, jobs: int) -> None:
        """Change concurrency; below the number running, the newest surplus attempts are
        stopped (SIGTERM, grace) and go back to pending, to resume when a slot frees."""
        self.jobs = jobs
        self.store.set_run(jobs=jobs)  # `orch status` shows the limit in force; resume keeps it
        running = [r for r in self.shard_runs if r.life.state is State.RUNNING]
        surplus = len(running) - jobs
        if surplus > 0:
            newest = sorted(running, key=lambda r: (r.life.started_at or 0.0, r.index))
            for run in reversed(newest[-surplus:]):
                self._restarted.add(run)  # first in line when capacity returns
                self.apply(run, lc.StopRequested(Intent.SCALE))
        self.loop.call_when_idle(self._commit)
        self._schedule()

    def status(self) -> dict[str, Any]:
        """The live figures ``orch status`` asks the control port for."""
        done, total = self.items()
        return {
            "run": self.run_id,
            "counts": self.counts(),
            "jobs": self.jobs,
            "running": self.running,
            "items_done": done,
            "items_total": total,
            "received": self.channel.received,
            "dropped": {
                "garbage": self.tracker.garbage_messages(),
                "stale": self.tracker.stale_messages,
            },
        }

    # --- the lifecycle --------------------------------------------------------------

    def apply(self, run: ShardRun, event: lc.Event) -> None:
        old = run.life
        new, actions = lc.step(old, event, self.loop.clock(), self.policy, self.ports.rand)
        run.life = new
        # Record the change before acting: an action (a spawn that fails) may step again.
        if new.state is not old.state:
            self._changed(run, old, new)
        for action in actions:
            self._act(run, action)

    def _act(self, run: ShardRun, action: lc.Action) -> None:
        match action:
            case lc.Spawn(attempt=attempt):
                self.attempts.start(run, attempt)
            case lc.Signal(signum=signum):
                if run.handle is not None:
                    self.backend.signal(run.handle, signum)
            case lc.SetTimer(kind=kind, at=at):
                event: lc.Event = (
                    lc.BackoffElapsed() if kind is lc.TimerKind.BACKOFF else lc.GraceElapsed()
                )
                self.loop.timers.set((run.index, kind), at, lambda: self.apply(run, event))
            case lc.CancelTimer(kind=kind):
                self.loop.timers.cancel((run.index, kind))

    def _changed(self, run: ShardRun, old: lc.Shard, new: lc.Shard) -> None:
        self._counts[old.state.value] -= 1
        self._counts[new.state.value] += 1
        if new.state.holds_slot and not old.state.holds_slot:
            self.running += 1
        elif old.state.holds_slot and not new.state.holds_slot:
            self.running -= 1
        if new.state.terminal and not old.state.terminal:
            self._unfinished -= 1
            run.close_logs()
        elif old.state.terminal and not new.state.terminal:
            self._unfinished += 1
        fields: dict[str, Any] = {
            "state": new.state.value,
            "reason": new.reason,
            "updated_at": self.ports.wall(),
        }
        if run in self._rolling_out and (new.state is State.RUNNING or new.state.terminal):
            self._rolling_out.discard(run)
            self.loop.call_when_idle(self._roll)
        if new.state is State.PENDING:
            if run in self._restarted:
                self._restarted.discard(run)
                self.ready.appendleft(run)
            else:
                self.ready.append(run)
        if new.state is State.FAILED:
            self.view.event(f"shard {run.id} failed: {new.reason}")
            if run.notes:
                fields["last_error"] = "\n".join(run.notes)
            limit = self.task.max_failed
            if limit is not None and not self.aborted and self._counts["failed"] > limit:
                self.aborted = True  # from now on nothing starts; the rest stop when idle
                self.loop.call_when_idle(self._abort)
        self.store.set_shard(run.index, **fields)
        self.events.publish(
            {
                "t": fields["updated_at"],
                "shard": run.id,
                "index": run.index,
                "from": old.state.value,
                "state": new.state.value,
                "attempt": new.attempt,
                "reason": new.reason,
                "intent": new.intent.value if new.intent is not None else None,
            }
        )
        self.loop.call_when_idle(self._schedule)
        self.loop.call_when_idle(self._commit)

    # --- dispatch and the group commit -------------------------------------------------

    def _abort(self) -> None:
        """More shards failed than ``max_failed``: stop the others; the run ends failed."""
        self.view.event(
            f"{self._counts['failed']} shards failed (max_failed {self.task.max_failed}): "
            "stopping the run"
        )
        self.ready.clear()
        self._rolling.clear()
        for run in self.shard_runs:
            self.apply(run, lc.StopRequested(Intent.ABORT))

    def _schedule(self) -> None:
        ready = self.ready
        while (
            ready
            and self.running < self.jobs
            and self.interrupted is None
            and self.store_error is None
            and not self.aborted
        ):
            run = ready.popleft()
            if run.life.state is State.PENDING:
                self.apply(run, lc.Start())

    def _commit(self) -> None:
        """Announce new process groups, record start times, commit, then send the acks that
        depend on what was just committed."""
        self.ports.guardian.flush()
        for handle in self.backend.stamp():
            assert handle.create_time is not None
            self.store.attempt_identity(handle.spec.index, handle.spec.attempt, handle.create_time)
        if self.store.dirty:
            if "store-retry" in self.loop.timers:
                return  # the disk is refusing writes: wait for the retry
            try:
                self.store.commit()
            except StoreUnwritable as exc:
                self._store_refused(exc)
                return  # no acknowledgement for what is not saved
            self.events.committed()
            if self._store_failing_since is not None:
                self._store_failing_since = None
                self._store_retry_s = STORE_RETRY_DELAYS_S[0]
                if self.store_error is None:
                    self.view.event(f"{self.store.path}: writing again")
        if self.tracker.acks:
            self.tracker.acks.send()

    def _store_refused(self, exc: StoreUnwritable) -> None:
        """The disk refused the run's state: retry with backoff (everything staged is
        kept), and stop the run cleanly when it still refuses after STORE_RETRY_S."""
        now = self.loop.clock()
        if self._store_failing_since is None:
            self._store_failing_since = now
        elif now - self._store_failing_since >= STORE_RETRY_S and self.store_error is None:
            self._give_up_store(exc)
        delay, self._store_retry_s = (
            self._store_retry_s,
            min(self._store_retry_s * 2, STORE_RETRY_DELAYS_S[1]),
        )
        self.loop.timers.set("store-retry", now + delay, self._commit)

    def _give_up_store(self, exc: StoreUnwritable) -> None:
        """Stop every shard: a run whose progress and checkpoints cannot be saved must
        not go on. One line says where and why, and how to finish the run."""
        if self.store_error is not None:
            return
        self.store_error = exc.reason
        self.view.event(
            f"{exc.path}: {exc.reason}; stopping the run "
            f"(free some space, then 'orch resume {self.run_id}')"
        )
        if not self.finished:
            self.stop_all(Intent.SHUTDOWN)

    # --- timers ---------------------------------------------------------------------

    def _tick(self) -> None:
        self.view.tick(self)
        self.tracker.flush_counters()  # garbage can arrive while no shard reports progress
        if self.store.dirty:
            self.loop.call_when_idle(self._commit)
        self.loop.timers.set("tick", self.loop.clock() + self.view.tick_s, self._tick)

    def _sinks_tick(self) -> None:
        """A recording sink's timer (a notifier's digests): what it staged goes in the next
        group commit; it never waits."""
        deadline = self.events.tick(self.loop.clock())
        if self.store.dirty:
            self.loop.call_when_idle(self._commit)
        if deadline is not None:
            self.loop.timers.set("sinks", deadline, self._sinks_tick)

    def _check_memory(self) -> None:
        self.tracker.check_memory(self.shard_runs)
        self.loop.timers.set("memory", self.loop.clock() + MEMORY_CHECK_S, self._check_memory)

    # --- the run's figures ----------------------------------------------------------------

    def items(self) -> tuple[int, int | None]:
        """(items done, items in all) over every shard; None while a total is unknown."""
        done, total, known = 0, 0, True
        for run in self.shard_runs:
            done += run.done or 0
            if run.total is None:
                known = known and run.life.state.terminal
            else:
                total += run.total
        return done, (total if known and total else None)

    def counts(self) -> dict[str, int]:
        """Shards by state (states with none left out), kept up to date by ``_changed``."""
        return {state: n for state, n in self._counts.items() if n}

    def run_state(self) -> str:
        if not self.finished:
            return "running"
        counts = self.counts()
        if self.interrupted is not None or self.store_error is not None:
            return "stopped"
        if counts.get("failed"):
            return "failed"
        if counts.get("stopped"):
            return "stopped"
        return "done"

    def exit_code(self) -> int:
        if self.store_error is not None:
            return RET_FAILED
        if self.interrupted == signal.SIGINT:
            return RET_INTERRUPTED
        if self.interrupted is not None:
            return 128 + self.interrupted
        return RET_OK if self.run_state() == "done" else RET_FAILED
