"""What running attempts report about themselves: the master's ``Tracker``.

Messages from the heartbeat channel and ``##orch`` lines from stdout both
land here, already matched to their ``ShardRun``. Each counts as a
heartbeat for the attempt's ``Watch``; progress is kept in memory and
flushed to the store at most every ``PROGRESS_FLUSH_S`` (so a thousand
shards reporting several times a second cost a few hundred row updates a
second). A checkpoint is staged in the store and its ack in ``Acks``; the
master's group commit writes the one, then sends the other, in the same
loop iteration. The tracker also fires the liveness watch (hung, stalled)
and the memory check, each as a lifecycle ``Kill``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from orchestrator import lifecycle as lc
from orchestrator.backends import AttemptHandle, Backend
from orchestrator.lifecycle import State
from orchestrator.logs import stamp
from orchestrator.loop import Loop
from orchestrator.ports import HeartbeatChannel, Reporter
from orchestrator.shard import ShardRun, ShardRuns
from orchestrator.store import Store
from orchestrator.units import format_bytes
from shards import protocol as proto

PROGRESS_FLUSH_S = 0.5
#: Bad ##orch lines of one attempt logged one by one; the rest are counted.
BAD_LINES_LOGGED = 5
#: Longest part of a bad line quoted in its log line.
BAD_LINE_QUOTE = 120
#: How often attempts are measured against ``max_memory``.
MEMORY_CHECK_S = 1.0

Apply = Callable[[ShardRun, lc.Event], None]


class Acks:
    """Checkpoint and end acks: staged with the store writes they confirm, built and sent
    by ``send`` right after the master's commit; a refusal (stale attempt) goes at once."""

    def __init__(self, channel: HeartbeatChannel) -> None:
        self._channel = channel
        self._staged: list[tuple[bytes, proto.Message]] = []

    def __bool__(self) -> bool:
        return bool(self._staged)

    def stage(self, identity: bytes, msg: proto.Message) -> None:
        self._staged.append((identity, msg))

    def refuse(self, identity: bytes, msg: proto.Message, why: str) -> None:
        self._channel.reply(identity, _reply(proto.Kind.NACK, msg, why))

    def send(self) -> None:
        """Acknowledge what was staged: call only once the store has committed it."""
        staged, self._staged = self._staged, []
        for identity, msg in staged:
            self._channel.reply(identity, _reply(proto.Kind.ACK, msg, None))


def _reply(kind: proto.Kind, msg: proto.Message, why: str | None) -> proto.Message:
    return proto.Message(
        kind=kind, run=msg.run, shard=msg.shard, attempt=msg.attempt, seq=msg.seq, message=why
    )


class Tracker:
    def __init__(
        self,
        *,
        loop: Loop,
        store: Store,
        runs: ShardRuns,
        backend: Backend,
        channel: HeartbeatChannel,
        view: Reporter,
        wall: Callable[[], float],
        apply: Apply,
        commit: Callable[[], None],
        max_memory_bytes: int | None,
    ) -> None:
        self._loop = loop
        self._store = store
        self._runs = runs
        #: Unfinished shards looked up by id: the heartbeat's fast path (``ShardRuns.find``).
        self._cached = runs.cached
        self._backend = backend
        self._channel = channel
        self._view = view
        self._wall = wall
        self._apply = apply
        self._commit = commit
        self._max_memory_bytes = max_memory_bytes
        self.acks = Acks(channel)
        self.stale_messages = 0
        self.unknown_messages = 0
        self._counted: dict[str, int] = {}
        self._dirty: dict[ShardRun, None] = {}  # ordered: flushed in the order they reported
        self._beat_now = float("nan")  # the loop clock of the last heartbeat batch ...
        self._beat_wall = 0.0  # ... and the wall clock read with it

    # --- heartbeats and progress -------------------------------------------------

    def beat(self, run: ShardRun, done: int | None, total: int | None, sdk: bool = True) -> None:
        """A sign of life, with progress when it carries some; ``sdk`` False for a
        ``##orch`` line (see ``liveness.Watch.beat``)."""
        loop = self._loop
        run.report(done, total, loop.clock(), self._wall(), sdk=sdk)
        if run.watch is not None:
            self.arm_watch(run)
        if not self._dirty:
            loop.timers.set("progress", loop.clock() + PROGRESS_FLUSH_S, self.flush_progress)
        self._dirty[run] = None

    def flush_one(self, run: ShardRun) -> None:
        self._store.set_progress_many([run.progress_row()])
        self._dirty.pop(run, None)

    def flush_progress(self) -> None:
        """Write every shard that reported since the last flush: one statement."""
        self._store.set_progress_many(run.progress_row() for run in self._dirty)
        self._dirty.clear()
        self.flush_counters()
        self._loop.call_when_idle(self._commit)

    # --- the liveness watch -------------------------------------------------------

    def arm_watch(self, run: ShardRun) -> None:
        watch = run.watch
        if watch is None or run.watch_armed:
            return
        deadline = watch.next_deadline()
        if deadline is not None:
            run.watch_armed = True
            self._loop.timers.set((run.index, "watch"), deadline, lambda: self._check_watch(run))

    def disarm_watch(self, run: ShardRun) -> None:
        run.watch_armed = False
        self._loop.timers.cancel((run.index, "watch"))

    def _check_watch(self, run: ShardRun) -> None:
        run.watch_armed = False  # the timer fired
        if run.watch is None or run.life.state is not State.RUNNING:
            return
        verdict = run.watch.verdict(self._loop.clock())
        if verdict is None:
            self.arm_watch(run)
            return
        intent, reason = verdict
        self._view.event(f"shard {run.id}: {reason}; killing attempt {run.life.attempt}")
        self._apply(run, lc.Kill(intent, reason))

    # --- memory -------------------------------------------------------------------

    def check_memory(self, runs: Iterable[ShardRun]) -> None:
        """Restart attempts over ``max_memory`` (pm2's max_memory_restart), reason ``memory``.

        An attempt's memory is what the backend measures for it (locally: the
        RSS of its whole process group, a shell script's children included).
        """
        limit = self._max_memory_bytes
        if limit is None:
            return
        live = [r for r in runs if r.handle is not None and r.life.state is State.RUNNING]
        handles = [r.handle for r in live if r.handle is not None]
        for run, rss in zip(live, self._backend.rss(handles), strict=True):
            if rss is None:
                continue
            run.rss = rss
            if rss > limit:
                reason = f"memory: rss {format_bytes(rss)} over max_memory {format_bytes(limit)}"
                self._view.event(f"shard {run.id}: {reason}")
                self._apply(run, lc.Kill(lc.Intent.MEMORY, reason))

    # --- messages -----------------------------------------------------------------

    def on_message(self, identity: bytes, msg: proto.Message) -> None:
        """A message from the heartbeat channel (the hot path: 100,000 a second).

        One from an attempt that is not its shard's current one, or from no shard of
        this run (forged or misrouted), is counted, and a checkpoint or end refused.
        """
        run = self._cached.get(msg.shard) or self._runs.find(msg.shard)
        if run is None or run.life.attempt != msg.attempt:
            if run is None:
                self.unknown_messages += 1
            else:
                self.stale_messages += 1
            if msg.kind in (proto.Kind.CHECKPOINT, proto.Kind.END):
                self.acks.refuse(identity, msg, "stale attempt: a newer one runs")
            return
        self.beat(run, msg.done, msg.total)
        if msg.kind is proto.Kind.CHECKPOINT:
            self._checkpoint(run, msg.checkpoint, msg.done)
            self.acks.stage(identity, msg)
            self._loop.call_when_idle(self._commit)
        elif msg.kind is proto.Kind.END:
            self.flush_one(run)
            self.acks.stage(identity, msg)
            self._loop.call_when_idle(self._commit)
        if msg.rss is not None:
            run.rss = msg.rss

    def on_heartbeat(
        self,
        identity: bytes,
        fields: tuple[str, int, int | None, int | None, int | None],
        now: float,
    ) -> None:
        """A valid heartbeat of this run (the fast path of ``on_message``, no ``Message``).

        ``now`` is the loop's clock read once per batch; the wall clock is read
        once per batch too. Counted exactly as ``on_message`` counts.
        """
        shard, attempt, done, total, rss = fields
        run = self._cached.get(shard)
        if run is None:
            run = self._runs.find(shard)
        if run is None:
            self.unknown_messages += 1
            return
        if run.life.attempt != attempt:
            self.stale_messages += 1
            return
        if now != self._beat_now:
            self._beat_now = now
            self._beat_wall = self._wall()
        run.report(done, total, now, self._beat_wall)
        live = run.live
        if live is not None and live.watch is not None and not live.watch_armed:
            self.arm_watch(run)
        dirty = self._dirty
        if not dirty:
            self._loop.timers.set("progress", now + PROGRESS_FLUSH_S, self.flush_progress)
        dirty[run] = None
        if rss is not None:
            run.rss = rss

    def stdout_line(self, run: ShardRun, handle: AttemptHandle, line: bytes) -> None:
        """One ``##orch`` line the attempt printed (shards that are not Python)."""
        if run.handle is not handle:
            return
        try:
            report = proto.parse_line(line)
        except proto.ProtocolError as exc:
            self._store.add_counter("bad_stdout_lines", 1)
            self._bad_line(run, line, str(exc))
            return
        if report is None:
            return
        done = report.done
        if report.advance is not None:
            # Saturate: a sum past 2**63-1 would overflow the store (and the master with it).
            done = min((run.done or 0) + report.advance, proto.MAX_INT)
        self.beat(run, done, report.total, sdk=False)
        if report.message is not None:
            self._store.set_shard(run.index, message=report.message[:1000])
        if report.has_checkpoint:
            self._checkpoint(run, report.checkpoint, run.done)
            self._loop.call_when_idle(self._commit)

    def _bad_line(self, run: ShardRun, line: bytes, problem: str) -> None:
        """Say what is wrong with a ##orch line: in the shard's stderr log and in -v output,
        for the first few of an attempt (``bad_lines_summary`` counts the rest)."""
        run.bad_lines += 1
        if run.bad_lines > BAD_LINES_LOGGED or run.logs is None:
            return
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if len(text) > BAD_LINE_QUOTE:
            text = text[: BAD_LINE_QUOTE - 3] + "..."
        note = f"bad ##orch line: {problem}: {text!r}"
        run.logs.err.note(stamp(), f"orch: {note}")
        if self._view.verbose:
            self._view.event(f"shard {run.id}: {note}")

    def bad_lines_summary(self, run: ShardRun) -> None:
        """At the end of an attempt: how many bad ##orch lines were not logged one by one."""
        more = run.bad_lines - BAD_LINES_LOGGED
        if more > 0 and run.logs is not None:
            note = f"{more} more bad ##orch line{'s' if more > 1 else ''} not shown"
            run.logs.err.note(stamp(), f"orch: {note}")
            if self._view.verbose:
                self._view.event(f"shard {run.id}: {note}")
        run.bad_lines = 0

    def _checkpoint(self, run: ShardRun, checkpoint: Any, done: int | None) -> None:
        run.keep_checkpoint(checkpoint, done)
        self._store.set_shard(
            run.index,
            # Encoded here so that a JSON null is stored as "null", not as no checkpoint.
            checkpoint=orjson.dumps(checkpoint),
            checkpoint_done=run.checkpoint_done,
            checkpoint_at=self._wall(),
        )
        self.flush_one(run)

    # --- dropped-message counters -----------------------------------------------------

    def garbage_messages(self) -> int:
        return self._channel.garbage + self.unknown_messages

    def flush_counters(self) -> None:
        """Write the dropped-message counters' growth since the last flush to the store."""
        now = {"dropped_garbage": self.garbage_messages(), "dropped_stale": self.stale_messages}
        for name, value in now.items():
            delta = value - self._counted.get(name, 0)
            if delta:
                self._store.add_counter(name, delta)
                self._counted[name] = value
