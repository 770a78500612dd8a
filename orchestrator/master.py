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
them end is ``Attempts``, what they report is ``Tracker``; the queue is a
``ReadyQueue``, the counts a ``Tally``, a rolling restart a ``RollingRestart``
and a disk that refuses commits a ``StoreRetry``. Everything it reaches the
world through arrives in ``Ports`` (see orchestrator.assemble).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from orchestrator import lifecycle as lc
from orchestrator import procfs
from orchestrator.attempts import Attempts
from orchestrator.backends import AttemptHandle, Stream
from orchestrator.config import TaskConfig
from orchestrator.lifecycle import Intent, State
from orchestrator.ports import FanOut, Ports, View
from orchestrator.progress import MEMORY_CHECK_S, Tracker
from orchestrator.ready import ReadyQueue
from orchestrator.rolling import RollingRestart
from orchestrator.shard import ShardRun, ShardRuns
from orchestrator.sources import ShardList
from orchestrator.store import Store, StoreUnwritable
from orchestrator.storeretry import StoreRetry
from orchestrator.tally import Tally, items
from orchestrator.template import compile_command

__all__ = ["Master"]


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
        #: By index, like the store and the shard list (made when first used).
        self.shard_runs = ShardRuns(shards)
        self.ready = ReadyQueue()
        self.tally = Tally()
        self.interrupted: int | None = None
        #: Commits the disk refuses are retried; its ``error`` is set when the run gave up.
        self.store_retry = StoreRetry(
            loop=self.loop,
            view=self.view,
            run_id=run_id,
            commit=self._commit,
            stop=self._stop_for_store,
        )
        #: Set once more shards failed than max_failed allows: the rest are stopped.
        self.aborted = False
        self.rolling = RollingRestart(lambda run: self.restart_shard(run.index))
        self.tracker = Tracker(
            loop=self.loop,
            store=store,
            runs=self.shard_runs,
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
        self.channel.bind(self.tracker.on_message, self.tracker.on_heartbeat)
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
        return self.tally.finished

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
            # (A shard never started has no attempt to take back.)
            for run in list(self.shard_runs.made()):
                if run.life.state is State.PENDING:
                    self.attempts.reattach(run)
        self.view.started(self)
        loop.timers.set("tick", loop.clock() + self.view.tick_s, self._tick)
        self._sinks_tick()
        if self.task.max_memory_bytes is not None:
            loop.timers.set("memory", loop.clock() + MEMORY_CHECK_S, self._check_memory)
        self._schedule()

    def _load(self) -> None:
        """One ``ShardRun`` per stored shard: fresh runs and resumed ones alike; a shard
        that never started (pending, nothing stored) gets its run when first used."""
        pending = State.PENDING.value
        runs, shards, ready, tally = self.shard_runs, self.shards, self.ready, self.tally
        listed = len(shards)
        for row in self.store.resume_rows():
            idx, shard_id, state, attempts, reason, _, total, _, cp_done, has_cp = row
            if (
                state == pending
                and not attempts
                and reason is None
                and total is None
                and cp_done is None
                and not has_cp
                and idx == len(runs)
                and idx < listed
                and shards.id_at(idx) == shard_id
            ):
                runs.add_fresh()
                tally.add(State.PENDING)
                ready.push(idx)
                continue
            run = ShardRun.from_row(row, self.retry_failed)
            if run.index < listed:
                list_id = shards.id_at(run.index)
                if list_id == run.id:
                    run.id = list_id  # one string per id, the shard list's (not the store's too)
            runs.add(run)
            tally.add(run.life.state)
            if not run.life.state.terminal:
                ready.push(run.index)
                if state != pending:
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
            self.store_retry.give_up(exc)
            code = self.exit_code()
            end = {"run": self.run_state(), "exit_code": code}
        else:
            self.events.committed()
        self.events.publish(end)
        ports.close()
        return code

    # --- what the backend reports (the channel's messages go to the tracker) ---------------

    def on_output(self, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        self.attempts.output(self.shard_runs[handle.spec.index], handle, stream, data)

    def on_exit(self, handle: AttemptHandle, code: int) -> None:
        self.attempts.exited(self.shard_runs[handle.spec.index], handle, code)

    def on_waiting(self, handle: AttemptHandle, why: str) -> None:
        self.attempts.waiting(self.shard_runs[handle.spec.index], handle, why)
        self.loop.call_when_idle(self._commit)

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
        return self.shard_runs.index_of(shard_id)

    def stop_all(self, intent: Intent = Intent.STOP) -> None:
        self.ready.clear()
        for run in self.shard_runs:
            self.apply(run, lc.StopRequested(intent))

    def stop_shard(self, idx: int) -> None:
        run = self.shard_runs[idx]
        self.ready.forget(idx)
        self.apply(run, lc.StopRequested(Intent.STOP))

    def restart_shard(self, idx: int) -> None:
        run = self.shard_runs[idx]
        self.ready.first_next_time(idx)
        self.apply(run, lc.RestartRequested())

    def restart_all(self, rolling: int | None = None) -> int:
        """Restart every running shard; with ``rolling`` K, at most K at a time, the next
        one once a restarted one is running again. Returns how many will be restarted."""
        live = [r for r in self.shard_runs.made() if r.life.state is State.RUNNING]
        if rolling is None:
            for run in live:
                self.restart_shard(run.index)
            return len(live)
        self.rolling.begin(live, rolling)
        return len(live)

    def scale(self, jobs: int) -> None:
        """Change concurrency; below the number running, the newest surplus attempts are
        stopped (SIGTERM, grace) and go back to pending, to resume when a slot frees."""
        self.jobs = jobs
        self.store.set_run(jobs=jobs)  # `orch status` shows the limit in force; resume keeps it
        running = [r for r in self.shard_runs.made() if r.life.state is State.RUNNING]
        surplus = len(running) - jobs
        if surplus > 0:
            newest = sorted(running, key=lambda r: (r.life.started_at or 0.0, r.index))
            for run in reversed(newest[-surplus:]):
                self.ready.first_next_time(run.index)  # first in line when capacity returns
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
        self.tally.change(old.state, new.state)
        notes = run.notes  # the last failed attempt's, gone with the logs when the shard ends
        if new.state.terminal and not old.state.terminal:
            run.close_logs()
            self.shard_runs.forget(run)
        fields: dict[str, Any] = {
            "state": new.state.value,
            "reason": new.reason,
            "updated_at": self.ports.wall(),
        }
        if self.rolling.settled(run, new.state):
            self.loop.call_when_idle(self.rolling.roll)
        if new.state is State.PENDING:
            self.ready.push(run.index)
        if new.state is State.FAILED:
            self.view.event(f"shard {run.id} failed: {new.reason}")
            if notes:
                fields["last_error"] = "\n".join(notes)
            limit = self.task.max_failed
            if limit is not None and not self.aborted and self.tally.by_state["failed"] > limit:
                self.aborted = True  # from now on nothing starts; the rest stop when idle
                self.loop.call_when_idle(self._abort)
        self.store.set_shard(run.index, **fields)
        self.events.publish(run.change_event(old, fields["updated_at"]))
        self.loop.call_when_idle(self._schedule)
        self.loop.call_when_idle(self._commit)

    # --- dispatch and the group commit -------------------------------------------------

    def _abort(self) -> None:
        """More shards failed than ``max_failed``: stop the others; the run ends failed."""
        self.view.event(
            f"{self.tally.by_state['failed']} shards failed (max_failed {self.task.max_failed}): "
            "stopping the run"
        )
        self.ready.clear()
        self.rolling.cancel()
        for run in self.shard_runs:
            self.apply(run, lc.StopRequested(Intent.ABORT))

    def _schedule(self) -> None:
        ready = self.ready
        while (
            ready
            and self.running < self.jobs
            and self.interrupted is None
            and self.store_retry.error is None
            and not self.aborted
        ):
            run = self.shard_runs[ready.pop()]
            if run.life.state is State.PENDING:
                self.apply(run, lc.Start())
        self.attempts.settle()  # the batch's records, logs and watches, after its last spawn

    def _commit(self) -> None:
        """Announce new process groups, record start times, commit, then send the acks that
        depend on what was just committed."""
        self.ports.guardian.flush()
        for handle in self.backend.stamp():
            assert handle.create_time is not None
            self.store.attempt_identity(handle.spec.index, handle.spec.attempt, handle.create_time)
        if self.store.dirty:
            if self.store_retry.waiting:
                return  # the disk is refusing writes: wait for the retry
            try:
                self.store.commit()
            except StoreUnwritable as exc:
                self.store_retry.refused(exc)
                return  # no acknowledgement for what is not saved
            self.events.committed()
            self.store_retry.committed(self.store.path)
        if self.tracker.acks:
            self.tracker.acks.send()

    def _stop_for_store(self) -> None:
        """The run gave up on its disk: stop every shard still going."""
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
        self.tracker.check_memory(self.shard_runs.made())
        self.loop.timers.set("memory", self.loop.clock() + MEMORY_CHECK_S, self._check_memory)

    # --- the run's figures (kept by the tally) ---------------------------------------------

    @property
    def running(self) -> int:
        return self.tally.running

    def items(self) -> tuple[int, int | None]:
        done, total = items(self.shard_runs.made())
        # A shard never started has reported no total: the run's total is not known yet.
        return done, (None if self.shard_runs.unmade else total)

    def counts(self) -> dict[str, int]:
        return self.tally.counts()

    def run_state(self) -> str:
        stopped = self.interrupted is not None or self.store_retry.error is not None
        return self.tally.run_state(stopped=stopped)

    def exit_code(self) -> int:
        store_failed = self.store_retry.error is not None
        return self.tally.exit_code(interrupted=self.interrupted, store_failed=store_failed)
