"""Starting attempts and hearing them end: the master's ``Attempts``.

``start`` renders the shard's argv and environment (the ORCH_* protocol
variables, the checkpoint) and starts the attempt through the backend;
the backend reports output (stamped into the shard's logs, with ``##orch``
lines handed to the tracker) and, once the whole process group is gone,
the exit, which becomes the lifecycle's ``Exited`` event. An attempt's
start and its end are each recorded in one place, with one wall-clock
read, in the attempts table and the shard's row alike.

What the next spawn does not need waits until the batch is started:
``start`` spawns and makes the attempt the shard's live one (``run.begin``,
so the master can signal it at once); its records in the store, its logs,
its guardian announcement and its liveness timer are done by ``settle``,
which the master calls when its dispatch loop ends (and the loop's idle
pass calls in any case). All of it happens before the loop looks for events
again, so no output, exit, message or commit can see an attempt half-known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import orjson

from orchestrator import lifecycle as lc
from orchestrator.backends import AttemptHandle, AttemptSpec, Backend, Stream
from orchestrator.config import TaskConfig
from orchestrator.errors import SpawnError, TemplateError
from orchestrator.lifecycle import State
from orchestrator.liveness import Watch
from orchestrator.logs import ShardLogs, pick_error, protocol_lines, stamp
from orchestrator.loop import Loop
from orchestrator.ports import Guard, HeartbeatChannel, Reporter
from orchestrator.progress import Apply, Tracker
from orchestrator.runs import LOGS
from orchestrator.shard import ShardRun
from orchestrator.sources import ShardList
from orchestrator.store import Store
from orchestrator.template import CommandTemplate, shard_values
from shards import protocol as proto

#: The environment that only an attempt's own master may give it.
PROTOCOL_ENV = frozenset(
    {
        proto.ENV_RUN_ID,
        proto.ENV_SHARD_ID,
        proto.ENV_SHARD_INDEX,
        proto.ENV_SHARD_COUNT,
        proto.ENV_ATTEMPT,
        proto.ENV_SHARD,
        proto.ENV_ENDPOINT,
        proto.ENV_HEARTBEAT_INTERVAL,
        proto.ENV_CHECKPOINT,
        proto.ENV_CHECKPOINT_DONE,
        proto.ENV_MASTER_PID,
        proto.ENV_SDK_PID,
        proto.ENV_CURVE_SERVER,
        proto.ENV_CURVE_PUBLIC,
        proto.ENV_CURVE_SECRET,
        proto.ENV_NODE,
    }
)


def base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every attempt inherits: the master's, minus an outer orch's
    protocol variables (``orch run`` from inside a shard): a stale ORCH_CHECKPOINT would
    make a first attempt skip work, ORCH_SDK_PID would keep its SDK from connecting."""
    return {k: v for k, v in environ.items() if k not in PROTOCOL_ENV}


class Attempts:
    def __init__(
        self,
        *,
        run_id: str,
        run_dir: str,
        task: TaskConfig,
        template: CommandTemplate,
        shards: ShardList,
        loop: Loop,
        store: Store,
        backend: Backend,
        channel: HeartbeatChannel,
        guardian: Guard,
        view: Reporter,
        wall: Callable[[], float],
        tracker: Tracker,
        apply: Apply,
        interrupted: Callable[[], bool],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._run_id = run_id
        self._logs_dir = os.path.join(run_dir, LOGS)
        self._task = task
        self._template = template
        self._shards = shards
        self._loop = loop
        self._store = store
        self._backend = backend
        self._channel = channel
        self._guardian = guardian
        self._view = view
        self._wall = wall
        self._tracker = tracker
        self._apply = apply
        self._interrupted = interrupted
        # ``environ``: the environment the run started with (orchestrator.environ).
        self._base_env = base_env(os.environ if environ is None else environ)
        self._master_pid = str(os.getpid())
        #: Attempts started and not yet settled: (shard, attempt, handle, wall-clock start).
        self._starting: list[tuple[ShardRun, int, AttemptHandle, float]] = []
        #: Shards whose live attempt waits for a node with room (its message says so).
        self._waited: set[int] = set()

    # --- starting -------------------------------------------------------------------

    def start(self, run: ShardRun, attempt: int) -> None:
        """Start attempt number ``attempt``; a failure to start becomes ``SpawnFailed``."""
        try:
            handle = self._backend.start(self.spec(run, attempt))
        except (SpawnError, TemplateError) as exc:
            at = self._wall()
            self._record_start(run, attempt, None, at)
            self._record_end(run, attempt, None, f"cannot start: {exc}", at)
            self._apply(run, lc.SpawnFailed(str(exc), getattr(exc, "transient", False)))
            return
        self._begin(run, handle)
        if not self._starting:
            self._loop.call_when_idle(self.settle)
        self._starting.append((run, attempt, handle, self._wall()))

    def settle(self) -> None:
        """Record, log, announce and watch the attempts started since the last call."""
        starting, self._starting = self._starting, []
        for run, attempt, handle, at in starting:
            self._settle(run, attempt, handle)
            self._record_start(run, attempt, handle, at)

    def reattach(self, run: ShardRun) -> bool:
        """On resume: take back the shard's last attempt if the backend finds it still
        alive (a previous master's Ray actor); the shard runs again without a new attempt."""
        attempt = run.life.attempt
        if attempt == 0:
            return False
        spec = AttemptSpec(index=run.index, shard_id=run.id, attempt=attempt, argv=(), env={})
        handle = self._backend.reattach(spec)
        if handle is None:
            return False
        self._apply(run, lc.Reattached())
        self._begin(run, handle)
        self._settle(run, attempt, handle)
        self._store.reopen_attempt(run.index, attempt)
        self._store.set_shard(
            run.index, attempts=attempt, ended_at=None, exit_code=None, signal=None
        )
        return True

    def _begin(self, run: ShardRun, handle: AttemptHandle) -> None:
        """Make ``handle`` the shard's live attempt, with its liveness watch."""
        task = self._task
        now = self._loop.clock()
        run.begin(
            handle,
            now,
            Watch(
                started_at=now,
                heartbeat_timeout_s=task.heartbeat_timeout_s,
                stall_timeout_s=task.stall_timeout_s,
                require_heartbeat=task.require_heartbeat,
                heartbeat_always=task.heartbeat_timeout_set,
            ),
        )

    def _settle(self, run: ShardRun, attempt: int, handle: AttemptHandle) -> None:
        """The rest of an attempt's start: guardian, logs, the liveness timer."""
        task = self._task
        if handle.pgid is not None:
            self._guardian.watch(handle.pgid)
        if run.logs is None:
            run.logs = ShardLogs(
                self._logs_dir,
                run.index,
                run.id,
                task.log_max_bytes,
                task.log_backups,
                self._view.event,
                echo=self._view.verbose,
            )
        run.logs.begin(attempt, handle.pid)
        self._tracker.arm_watch(run)

    def _record_start(
        self, run: ShardRun, attempt: int, handle: AttemptHandle | None, at: float
    ) -> None:
        pid = handle.pid if handle is not None else None
        pgid = handle.pgid if handle is not None else None
        create_time = handle.create_time if handle is not None else None
        self._store.attempt_started(
            run.index, attempt, pid=pid, pgid=pgid, create_time=create_time, started_at=at
        )
        if handle is None:
            self._store.set_shard(run.index, attempts=attempt, pid=None)
            return
        self._store.set_shard(
            run.index,
            attempts=attempt,
            pid=pid,
            pgid=pgid,
            pid_create_time=create_time,
            started_at=at,
            ended_at=None,
            exit_code=None,
            signal=None,
            done=run.done,
            start_done=run.done,
            rss_bytes=None,
        )

    def spec(self, run: ShardRun, attempt: int) -> AttemptSpec:
        """The attempt's argv and environment, fully rendered."""
        shard = self._shards[run.index]
        count = len(self._shards)
        cp_text = run.checkpoint_text()
        values = shard_values(
            shard,
            count,
            cp_text,
            fields=self._template.fields,
            checkpoint_value=run.checkpoint if run.has_checkpoint else None,
        )
        env = self._base_env.copy()
        env.update(self._template.render_env(values))
        env.update(
            {
                proto.ENV_RUN_ID: self._run_id,
                proto.ENV_SHARD_ID: shard.id,
                proto.ENV_SHARD_INDEX: str(run.index),
                proto.ENV_SHARD_COUNT: str(count),
                proto.ENV_ATTEMPT: str(attempt),
                proto.ENV_SHARD: orjson.dumps(dict(shard.record)).decode(),
                proto.ENV_HEARTBEAT_INTERVAL: f"{self._task.heartbeat_interval_s:g}",
                proto.ENV_MASTER_PID: self._master_pid,
                proto.ENV_ENDPOINT: self._channel.endpoint,
            }
        )
        if run.has_checkpoint:
            env[proto.ENV_CHECKPOINT] = cp_text
        if run.checkpoint_done is not None:
            env[proto.ENV_CHECKPOINT_DONE] = str(run.checkpoint_done)
        return AttemptSpec(
            index=run.index,
            shard_id=shard.id,
            attempt=attempt,
            argv=self._template.render_argv(values),
            env=env,
            cwd=self._task.cwd,
        )

    # --- output and exit ------------------------------------------------------------

    def output(self, run: ShardRun, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        if self._starting:
            self.settle()  # its logs exist before its first output
        logs = run.logs
        if logs is None:
            return
        ts = stamp()
        if stream is Stream.STDOUT:
            block = logs.out.feed(data, ts)
            for line in protocol_lines(block):
                self._tracker.stdout_line(run, handle, line)
        else:
            block = logs.err.feed(data, ts)
        if block and self._view.verbose:
            self._view.line(handle.spec.shard_id, stream, block)

    def waiting(self, run: ShardRun, handle: AttemptHandle, why: str) -> None:
        """The attempt waits for a node with room: until it is placed, ``why`` is the
        shard's message (the REASON of ``orch status``, ``message`` in its JSON)."""
        if self._starting:
            self.settle()
        if run.handle is handle:
            self._waited.add(run.index)
            self._store.set_shard(run.index, message=why)

    def placed(self, run: ShardRun, handle: AttemptHandle, node: str) -> None:
        """Where the attempt runs (backends with nodes): ``node`` in status. The message
        that it waited for room goes (it has not said anything of its own yet)."""
        if self._starting:
            self.settle()
        if run.handle is handle:
            run.node = node
            fields: dict[str, str | None] = {"node": node}
            if run.index in self._waited:
                self._waited.discard(run.index)
                fields["message"] = None
            self._store.set_shard(run.index, **fields)

    def exited(
        self, run: ShardRun, handle: AttemptHandle, code: int, lost: str | None = None
    ) -> None:
        """The attempt's whole process group is gone: record it, then step the lifecycle.

        ``lost``: it went with its node (``node lost: <node>``); recorded like a SIGKILL,
        stepped as ``Lost``: re-placed without counting against ``max_restarts``.
        """
        if self._starting:
            self.settle()  # its start is recorded before its end
        if run.handle is not handle:
            return
        what = lost or lc.describe_exit(code)
        logs = run.logs
        if logs is not None:
            # A last protocol line without a newline (PHP's echo adds none) still counts.
            for line in protocol_lines(logs.out.flush(stamp())):
                self._tracker.stdout_line(run, handle, line)
            self._tracker.bad_lines_summary(run)
            logs.end(handle.spec.attempt, what, self._loop.clock() - run.attempt_started)
            if code != 0:
                run.notes = logs.stderr_tail()
        run.end()
        if run.index in self._waited:  # it never left the queue for a node
            self._waited.discard(run.index)
            self._store.set_shard(run.index, message=None)
        if handle.pgid is not None:
            self._guardian.forget(handle.pgid)
        self._tracker.disarm_watch(run)
        self._tracker.flush_one(run)
        stopping = run.life.state is State.STOPPING and not lost
        reason = run.life.reason if stopping else what
        self._record_end(run, handle.spec.attempt, code, reason, self._wall())
        if lost:
            self._view.event(f"shard {run.id} attempt {handle.spec.attempt}: {lost}")
            self._store.set_shard(run.index, last_error=lost)
            self._apply(run, lc.Lost(lost))
            return
        if code != 0:
            # The tail of stderr, or at least how it ended: a failed shard always says why.
            self._store.set_shard(run.index, last_error="\n".join(run.notes) if run.notes else what)
            if run.life.state is State.RUNNING and not self._interrupted():
                why = f": {pick_error(run.notes)}" if run.notes else ""
                self._view.event(f"shard {run.id} attempt {handle.spec.attempt}: {what}{why}")
        self._apply(run, lc.Exited(code))

    def _record_end(
        self, run: ShardRun, attempt: int, code: int | None, reason: str | None, at: float
    ) -> None:
        """One attempt's end (``code`` None: it never started), in both tables at once."""
        exit_code = code if code is not None and code >= 0 else None
        signum = -code if code is not None and code < 0 else None
        self._store.attempt_ended(
            run.index, attempt, ended_at=at, exit_code=exit_code, signal=signum, reason=reason
        )
        if code is not None:
            self._store.set_shard(
                run.index, pid=None, ended_at=at, exit_code=exit_code, signal=signum
            )
