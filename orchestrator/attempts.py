"""Starting attempts and hearing from them: the master's process-facing half.

``_spawn`` renders the shard's argv and environment (the ORCH_* protocol
variables, the checkpoint) and starts the attempt through the backend; the
backend reports output (stamped into the shard's logs, with ``##orch``
lines fed to progress tracking) and, once the whole process group is gone,
the exit, which becomes the lifecycle's ``Exited`` event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator import lifecycle as lc
from orchestrator import procfs
from orchestrator.backends import AttemptHandle, AttemptSpec, Stream
from orchestrator.errors import SpawnError, TemplateError
from orchestrator.lifecycle import State
from orchestrator.liveness import Watch
from orchestrator.logs import ShardLogs, pick_error, protocol_lines, stamp
from orchestrator.runs import LOGS
from orchestrator.template import shard_values
from shards import protocol as proto

if TYPE_CHECKING:
    from orchestrator.backends import Backend
    from orchestrator.channel import Channel
    from orchestrator.config import TaskConfig
    from orchestrator.guardian import Guardian
    from orchestrator.loop import Loop
    from orchestrator.progress import Runtime
    from orchestrator.sources import ShardList
    from orchestrator.store import Store
    from orchestrator.template import CommandTemplate

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
    }
)


class Attempts:
    """Mixed into ``Master``: spawning attempts, their output and their exits."""

    def _stamp(self) -> None:
        """Record the start time of the processes spawned this iteration (pid reuse guard)."""
        handles, self._unstamped = self._unstamped, []
        for handle in handles:
            assert handle.pid is not None
            created = procfs.start_time(handle.pid)
            if created is None:
                continue  # already gone: its exit is on its way
            handle.create_time = created
            self.store.attempt_identity(handle.spec.index, handle.spec.attempt, created)

    rt: list[Runtime]
    loop: Loop
    store: Store
    shards: ShardList
    task: TaskConfig
    view: Any
    backend: Backend
    channel: Channel | None
    guardian: Guardian
    template: CommandTemplate
    run_id: str
    run_dir: str
    interrupted: int | None
    _base_env: dict[str, str]
    _unstamped: list[AttemptHandle]
    apply: Callable[[int, lc.Event], None]
    _arm_watch: Callable[[int], None]
    _flush_one: Callable[[int], None]
    _stdout_report: Callable[[int, AttemptHandle, bytes], None]
    bad_lines_summary: Callable[[int], None]

    def _spawn(self, idx: int, attempt: int) -> None:
        rt = self.rt[idx]
        shard = self.shards[idx]
        try:
            spec = self._spec(idx, attempt)
            handle = self.backend.start(spec)
        except (SpawnError, TemplateError) as exc:
            transient = getattr(exc, "transient", False)
            self.store.attempt_started(
                idx, attempt, pid=None, pgid=None, create_time=None, started_at=time.time()
            )
            self.store.attempt_ended(
                idx,
                attempt,
                ended_at=time.time(),
                exit_code=None,
                signal=None,
                reason=f"cannot start: {exc}",
            )
            self.store.set_shard(idx, attempts=attempt, pid=None)
            self.apply(idx, lc.SpawnFailed(str(exc), transient))
            return
        now_wall = time.time()
        rt.handle = handle
        if handle.pgid is not None:
            self.guardian.watch(handle.pgid)
        if handle.create_time is None and handle.pid is not None:
            self._unstamped.append(handle)
        rt.attempt_started = self.loop.clock()
        rt.notes = []
        rt.bad_lines = 0
        if rt.logs is None:
            rt.logs = ShardLogs(
                os.path.join(self.run_dir, LOGS),
                idx,
                shard.id,
                self.task.log_max_bytes,
                self.task.log_backups,
                self.view.event,
            )
        rt.logs.begin(attempt, handle.pid)
        rt.watch = Watch(
            started_at=rt.attempt_started,
            heartbeat_timeout_s=self.task.heartbeat_timeout_s,
            stall_timeout_s=self.task.stall_timeout_s,
            require_heartbeat=self.task.require_heartbeat,
            heartbeat_always=self.task.heartbeat_timeout_set,
        )
        rt.done = rt.checkpoint_done
        self._arm_watch(idx)
        self.store.attempt_started(
            idx,
            attempt,
            pid=handle.pid,
            pgid=handle.pgid,
            create_time=handle.create_time,
            started_at=now_wall,
        )
        self.store.set_shard(
            idx,
            attempts=attempt,
            pid=handle.pid,
            pgid=handle.pgid,
            pid_create_time=handle.create_time,
            started_at=now_wall,
            ended_at=None,
            exit_code=None,
            signal=None,
            done=rt.done,
            start_done=rt.done,
            rss_bytes=None,
        )

    def _spec(self, idx: int, attempt: int) -> AttemptSpec:
        rt = self.rt[idx]
        shard = self.shards[idx]
        cp_text = orjson.dumps(rt.checkpoint).decode() if rt.has_checkpoint else ""
        values = shard_values(
            shard,
            len(self.shards),
            cp_text,
            fields=self.template.fields,
            checkpoint_value=rt.checkpoint if rt.has_checkpoint else None,
        )
        env = self._base_env.copy()
        env.update(self.template.render_env(values))
        env.update(
            {
                proto.ENV_RUN_ID: self.run_id,
                proto.ENV_SHARD_ID: shard.id,
                proto.ENV_SHARD_INDEX: str(idx),
                proto.ENV_SHARD_COUNT: str(len(self.shards)),
                proto.ENV_ATTEMPT: str(attempt),
                proto.ENV_SHARD: orjson.dumps(dict(shard.record)).decode(),
                proto.ENV_HEARTBEAT_INTERVAL: f"{self.task.heartbeat_interval_s:g}",
                proto.ENV_MASTER_PID: str(os.getpid()),
            }
        )
        if self.channel is not None:
            env[proto.ENV_ENDPOINT] = self.channel.endpoint
        if rt.has_checkpoint:
            env[proto.ENV_CHECKPOINT] = cp_text
        if rt.checkpoint_done is not None:
            env[proto.ENV_CHECKPOINT_DONE] = str(rt.checkpoint_done)
        return AttemptSpec(
            index=idx,
            shard_id=shard.id,
            attempt=attempt,
            argv=self.template.render_argv(values),
            env=env,
            cwd=self.task.cwd,
        )

    def on_output(self, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        idx = handle.spec.index
        rt = self.rt[idx]
        if rt.logs is None:
            return
        ts = stamp()
        if stream is Stream.STDOUT:
            block = rt.logs.out.feed(data, ts)
            for line in protocol_lines(block):
                self._stdout_report(idx, handle, line)
        else:
            block = rt.logs.err.feed(data, ts)
        if block and self.view.verbose:
            self.view.line(handle.spec.shard_id, stream, block)

    def on_exit(self, handle: AttemptHandle, code: int) -> None:
        idx = handle.spec.index
        rt = self.rt[idx]
        if rt.handle is not handle:
            return
        what = lc.describe_exit(code)
        duration = self.loop.clock() - rt.attempt_started
        if rt.logs is not None:
            # A last protocol line without a newline (PHP's echo adds none) still counts.
            for line in protocol_lines(rt.logs.out.flush(stamp())):
                self._stdout_report(idx, handle, line)
            self.bad_lines_summary(idx)
            rt.logs.end(handle.spec.attempt, what, duration)
            if code != 0:
                rt.notes = rt.logs.stderr_tail()
        rt.handle = None
        rt.watch = None
        if handle.pgid is not None:
            self.guardian.forget(handle.pgid)
        self.loop.timers.cancel((idx, "watch"))
        self._flush_one(idx)
        reason = rt.life.reason if rt.life.state is State.STOPPING else what
        self.store.attempt_ended(
            idx,
            handle.spec.attempt,
            ended_at=time.time(),
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            reason=reason,
        )
        self.store.set_shard(
            idx,
            pid=None,
            ended_at=time.time(),
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
        )
        if code != 0:
            # The tail of stderr, or at least how it ended: a failed shard always says why.
            self.store.set_shard(idx, last_error="\n".join(rt.notes) if rt.notes else what)
        if code != 0 and rt.life.state is State.RUNNING and self.interrupted is None:
            why = f": {pick_error(rt.notes)}" if rt.notes else ""
            self.view.event(
                f"shard {handle.spec.shard_id} attempt {handle.spec.attempt}: {what}{why}"
            )
        self.apply(idx, lc.Exited(code))
