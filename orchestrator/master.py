"""The master: one process, one thread, one loop that owns every shard's state.

The master turns what happens (a slot frees, a child exits, a heartbeat or
a protocol line arrives, a timer fires, a signal or control request comes
in) into lifecycle events, runs them through ``lifecycle.step`` and carries
out the actions it returns: spawn through the backend, signal a process
group, set or cancel a timer. Every state change is staged in the store and
committed at the end of the loop iteration (group commit), before any reply
that depends on it (checkpoint acks) goes out.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator import lifecycle as lc
from orchestrator import procfs
from orchestrator.attempts import PROTOCOL_ENV, Attempts
from orchestrator.backends import AttemptHandle, Backend, Stream
from orchestrator.backends.local import LocalBackend
from orchestrator.channel import Channel
from orchestrator.config import TaskConfig
from orchestrator.control import ControlServer, Events
from orchestrator.errors import RET_FAILED, RET_INTERRUPTED, RET_OK
from orchestrator.guardian import Guardian
from orchestrator.lifecycle import Intent, State
from orchestrator.loop import Loop, raise_fd_limit
from orchestrator.progress import Runtime, Tracking
from orchestrator.runs import ipc_path
from orchestrator.sources import ShardList
from orchestrator.start import compile_command
from orchestrator.store import Store, StoreUnwritable
from shards import protocol as proto

#: Default ceiling on children alive at once when --jobs is not given.
DEFAULT_MAX_JOBS = 1000
#: File descriptors one live attempt costs the master: two pipes, two log files.
FDS_PER_ATTEMPT = 4


class View:
    """What the master tells the person watching; the base class says nothing."""

    def started(self, master: Master) -> None: ...
    def event(self, text: str) -> None: ...
    def line(self, shard_id: str, stream: Stream, data: bytes) -> None: ...
    def tick(self, master: Master) -> None: ...
    def finished(self, master: Master) -> None: ...

    verbose = False
    tick_s = 1.0


def default_jobs(count: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    fd_cap = max(1, (raise_fd_limit() - 64) // FDS_PER_ATTEMPT)
    return max(1, min(count, DEFAULT_MAX_JOBS, fd_cap))


#: How long state writes the disk refuses are retried before the run is stopped.
STORE_RETRY_S = 10.0
#: Delay between those retries: doubling from the first, up to the last.
STORE_RETRY_DELAYS_S = (0.1, 2.0)


class Master(Attempts, Tracking):
    def __init__(
        self,
        *,
        run_id: str,
        run_dir: str,
        task: TaskConfig,
        shards: ShardList,
        store: Store,
        view: View | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        backend: Callable[[Loop, Master], Backend] | None = None,
        retry_failed: bool = False,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.retry_failed = retry_failed
        self.task = task
        self.shards = shards
        self.store = store
        self.view = view or View()
        self.policy = lc.Policy.from_task(task)
        self.rand = rand
        self.loop = Loop(clock)
        self.jobs = default_jobs(len(shards), task.jobs)
        self.template = compile_command(task)
        self.rt: list[Runtime] = []
        self.ready: deque[int] = deque()
        self.running = 0
        self.started_wall = time.time()
        self.started_mono = clock()
        self.interrupted: int | None = None
        #: Set when the run's state could not be saved for STORE_RETRY_S: the run stops.
        self.store_error: str | None = None
        self._store_failing_since: float | None = None
        self._store_retry_s = STORE_RETRY_DELAYS_S[0]
        self.stale_messages = 0
        self.unknown_messages = 0
        self._counted: dict[str, int] = {}
        self._progress_dirty: set[int] = set()
        self._ids: dict[str, int] = {}
        self._acks: list[tuple[bytes, proto.Message]] = []
        self._unfinished = 0
        self._counts: Counter[str] = Counter()
        #: Shards a user restarted: "a new attempt now" puts them at the front of the queue.
        self._restarted: set[int] = set()
        self._unstamped: list[AttemptHandle] = []
        make_backend = backend or (
            lambda loop, m: LocalBackend(
                loop, m, stop_timeout_s=task.stop_timeout_s, jobs=self.jobs
            )
        )
        self.backend = make_backend(self.loop, self)
        self.channel: Channel | None = None
        self.control: ControlServer
        self.events: Events
        self.guardian: Guardian
        # Never inherit an outer orch's protocol variables (orch run from inside a shard):
        # a stale ORCH_CHECKPOINT would make a first attempt skip work, ORCH_SDK_PID would
        # keep its SDK from connecting.
        # ``base_env``: the environment the run started with (orchestrator.environ).
        start_env = os.environ if base_env is None else base_env
        self._base_env = {k: v for k, v in start_env.items() if k not in PROTOCOL_ENV}

    # --- setup --------------------------------------------------------------

    def _load_runtime(self) -> None:
        """Build each shard's runtime from the store: fresh runs and resumed ones alike."""
        pending = State.PENDING.value
        for (
            idx,
            shard_id,
            state_text,
            attempts,
            reason,
            done,
            total,
            cp,
            cp_done,
            has_cp,
        ) in self.store.resume_rows():
            state = State(state_text)
            if (
                not state.terminal
                or state is State.STOPPED
                or (self.retry_failed and state is State.FAILED)
            ):
                # A resumed run restarts whatever was not finished, stopped shards too
                # (a SIGTERM at reboot stops them all): done shards stay done, and
                # failed ones too unless asked (`orch resume --retry-failed`).
                state = State.PENDING
            rt = Runtime(
                life=lc.Shard(state=state, attempt=attempts or 0, reason=reason),
                done=cp_done,
                total=total,
            )
            if has_cp or cp_done is not None:
                rt.checkpoint, rt.has_checkpoint, rt.checkpoint_done = cp, has_cp, cp_done
            if state.terminal:
                rt.done = done
            else:
                self._unfinished += 1
                self.ready.append(idx)
                if state_text != pending:
                    self.store.set_shard(idx, state=pending, pid=None)
            self.rt.append(rt)
            self._counts[state.value] += 1
            self._ids[shard_id] = idx

    def run(self) -> int:
        """Supervise until every shard is terminal; return the run's exit code."""
        self._load_runtime()
        loop = self.loop
        loop.handle_signals(
            {
                signal.SIGCHLD: self.handle_sigchld,
                signal.SIGINT: self.handle_sigint,
                signal.SIGTERM: self.handle_sigterm,
                signal.SIGHUP: self.handle_sigterm,
            }
        )
        if self.task.cwd:
            os.chdir(self.task.cwd)
        # Fork the guardian before any thread exists (the ZeroMQ context starts some).
        self.guardian = Guardian(self.task.stop_timeout_s, self.run_id)
        path = ipc_path(self.run_dir, self.run_id, "hb.sock")
        self.channel = Channel(loop, path, self.run_id, self.on_message)
        self.events = Events(ipc_path(self.run_dir, self.run_id, "events.sock"))
        self.control = ControlServer(
            loop, ipc_path(self.run_dir, self.run_id, "control.sock"), self
        )
        self.store.set_run(
            state="running",
            master_pid=os.getpid(),
            master_create_time=procfs.start_time(os.getpid()),
            endpoint=self.channel.endpoint,
            control=self.control.endpoint,
            jobs=self.jobs,
            exit_code=None,
            ended_at=None,
        )
        self.store.commit()
        self.view.started(self)
        loop.timers.set("tick", loop.clock() + self.view.tick_s, self._tick)
        if self.task.max_memory_bytes is not None:
            loop.timers.set("memory", loop.clock() + 1.0, self._check_memory)
        self._schedule()
        try:
            while self._unfinished > 0 or self.running > 0:
                loop.run_once()
        finally:
            self._flush_progress()
            code = self.exit_code()
            self.store.set_run(state=self.run_state(), exit_code=code, ended_at=time.time())
            self.flush_counters()
            try:
                self.store.commit()
            except StoreUnwritable as exc:
                # The run stays "running" in the database, its master gone: `lost`,
                # which `orch resume` finishes once the disk has room again.
                self._give_up_store(exc)
                code = self.exit_code()
            self.events.publish({"run": self.run_state(), "exit_code": code})
            self.control.close()
            self.events.close()
            self.channel.close()
            self.backend.close()
            self.guardian.close(clean=not self.backend.live())
            loop.close()
        self.view.finished(self)
        return code

    # --- signals --------------------------------------------------------------

    def handle_sigchld(self, signum: int) -> None:
        reap = getattr(self.backend, "reap", None)
        if reap is not None:
            reap()

    def handle_sigint(self, signum: int) -> None:
        self._interrupt(signum)

    def handle_sigterm(self, signum: int) -> None:
        self._interrupt(signum)

    def _interrupt(self, signum: int) -> None:
        if self.interrupted is not None:
            self.view.event("second interrupt: killing every shard now")
            kill_all = getattr(self.backend, "kill_all", None)
            if kill_all is not None:
                kill_all()
            return
        self.interrupted = signum
        self.view.event(
            f"{signal.Signals(signum).name}: stopping every shard "
            f"(SIGTERM, then SIGKILL after {self.task.stop_timeout_s:g}s)"
        )
        self.stop_all(Intent.SHUTDOWN)

    # --- control (also used by the control socket) ------------------------------

    def stop_all(self, intent: Intent = Intent.STOP) -> None:
        self.ready.clear()
        for idx in range(len(self.rt)):
            self.apply(idx, lc.StopRequested(intent))

    def stop_shard(self, idx: int) -> None:
        self._restarted.discard(idx)
        self.apply(idx, lc.StopRequested(Intent.STOP))

    def restart_shard(self, idx: int) -> None:
        self._restarted.add(idx)
        self.apply(idx, lc.RestartRequested())

    def scale(self, jobs: int) -> None:
        self.jobs = jobs
        self.store.set_run(jobs=jobs)  # `orch status` shows the limit in force
        self.loop.call_when_idle(self._commit)
        self._schedule()

    # --- the lifecycle ----------------------------------------------------------

    def apply(self, idx: int, event: lc.Event) -> None:
        rt = self.rt[idx]
        old = rt.life
        now = self.loop.clock()
        new, actions = lc.step(old, event, now, self.policy, self.rand)
        rt.life = new
        # Record the change before acting: an action (a spawn that fails) may step again.
        if new.state is not old.state:
            self._changed(idx, old, new)
        for action in actions:
            self._act(idx, action)

    def _act(self, idx: int, action: lc.Action) -> None:
        match action:
            case lc.Spawn(attempt=attempt):
                self._spawn(idx, attempt)
            case lc.Signal(signum=signum):
                handle = self.rt[idx].handle
                if handle is not None:
                    self.backend.signal(handle, signum)
            case lc.SetTimer(kind=kind, at=at):
                event: lc.Event = (
                    lc.BackoffElapsed() if kind is lc.TimerKind.BACKOFF else lc.GraceElapsed()
                )
                self.loop.timers.set((idx, kind), at, lambda: self.apply(idx, event))
            case lc.CancelTimer(kind=kind):
                self.loop.timers.cancel((idx, kind))

    def _changed(self, idx: int, old: lc.Shard, new: lc.Shard) -> None:
        self._counts[old.state.value] -= 1
        self._counts[new.state.value] += 1
        if new.state.holds_slot and not old.state.holds_slot:
            self.running += 1
        elif old.state.holds_slot and not new.state.holds_slot:
            self.running -= 1
        if new.state.terminal and not old.state.terminal:
            self._unfinished -= 1
            rt = self.rt[idx]
            if rt.logs is not None:
                rt.logs.close()
                rt.logs = None
        elif old.state.terminal and not new.state.terminal:
            self._unfinished += 1
        fields: dict[str, Any] = {
            "state": new.state.value,
            "reason": new.reason,
            "updated_at": time.time(),
        }
        if new.state is State.PENDING:
            if idx in self._restarted:
                self._restarted.discard(idx)
                self.ready.appendleft(idx)
            else:
                self.ready.append(idx)
        if new.state is State.FAILED:
            rt = self.rt[idx]
            self.view.event(f"shard {self.shards[idx].id} failed: {new.reason}")
            if rt.notes:
                fields["last_error"] = "\n".join(rt.notes)
        self.store.set_shard(idx, **fields)
        self.events.publish(
            {
                "t": fields["updated_at"],
                "shard": self.shards[idx].id,
                "index": idx,
                "from": old.state.value,
                "state": new.state.value,
                "attempt": new.attempt,
                "reason": new.reason,
            }
        )
        self.loop.call_when_idle(self._schedule)
        self.loop.call_when_idle(self._commit)

    def _schedule(self) -> None:
        ready = self.ready
        while (
            ready
            and self.running < self.jobs
            and self.interrupted is None
            and self.store_error is None
        ):
            idx = ready.popleft()
            if self.rt[idx].life.state is State.PENDING:
                self.apply(idx, lc.Start())

    def _commit(self) -> None:
        self.guardian.flush()  # announce this iteration's new process groups first
        if self._unstamped:
            self._stamp()
        if self.store.dirty:
            if "store-retry" in self.loop.timers:
                return  # the disk is refusing writes: wait for the retry
            try:
                self.store.commit()
            except StoreUnwritable as exc:
                self._store_refused(exc)
                return  # no acknowledgement for what is not saved
            if self._store_failing_since is not None:
                self._store_failing_since = None
                self._store_retry_s = STORE_RETRY_DELAYS_S[0]
                if self.store_error is None:
                    self.view.event(f"{self.store.path}: writing again")
        if self._acks:
            acks, self._acks = self._acks, []
            assert self.channel is not None
            for identity, msg in acks:
                self.channel.ack(identity, msg)

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
        if self._unfinished or self.running:
            self.stop_all(Intent.SHUTDOWN)

    # --- reporting -----------------------------------------------------------------

    def _tick(self) -> None:
        self.view.tick(self)
        self.flush_counters()  # garbage can arrive while no shard reports progress
        if self.store.dirty:
            self.loop.call_when_idle(self._commit)
        self.loop.timers.set("tick", self.loop.clock() + self.view.tick_s, self._tick)

    def shard_index(self, shard_id: str) -> int | None:
        return self._ids.get(shard_id)

    def items(self) -> tuple[int, int | None]:
        done, total, known = 0, 0, True
        for rt in self.rt:
            done += rt.done or 0
            if rt.total is None:
                known = known and rt.life.state.terminal
            else:
                total += rt.total
        return done, (total if known and total else None)

    def flush_counters(self) -> None:
        """Write the dropped-message counters' growth since the last flush to the store."""
        now = {"dropped_garbage": self.garbage_messages(), "dropped_stale": self.stale_messages}
        for name, value in now.items():
            delta = value - self._counted.get(name, 0)
            if delta:
                self.store.add_counter(name, delta)
                self._counted[name] = value

    def garbage_messages(self) -> int:
        garbage = self.channel.garbage if self.channel is not None else 0
        return garbage + self.unknown_messages

    def counts(self) -> dict[str, int]:
        """Shards by state (states with none left out), kept up to date by ``_changed``."""
        return {state: n for state, n in self._counts.items() if n}

    def run_state(self) -> str:
        if self._unfinished > 0 or self.running > 0:
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
