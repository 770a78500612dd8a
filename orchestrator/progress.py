"""Heartbeats, progress, checkpoints and hang detection: the master's tracking half.

Messages from the heartbeat channel and ``##orch`` lines from stdout both
land here. Each counts as a heartbeat for the attempt's ``Watch``; progress
is kept in memory and flushed to the store at most every
``PROGRESS_FLUSH_S`` (so a thousand shards reporting several times a second
cost a few hundred row updates a second); a checkpoint is committed before
it is acknowledged, in the same loop iteration. Messages from an attempt
that is not the shard's current one are ignored and counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator import lifecycle as lc
from orchestrator import procfs
from orchestrator.backends import AttemptHandle
from orchestrator.lifecycle import Intent, State
from orchestrator.liveness import Watch
from orchestrator.logs import ShardLogs, stamp
from orchestrator.units import format_bytes
from shards import protocol as proto

if TYPE_CHECKING:
    from orchestrator.channel import Channel
    from orchestrator.config import TaskConfig
    from orchestrator.loop import Loop
    from orchestrator.sources import ShardList
    from orchestrator.store import Store

PROGRESS_FLUSH_S = 0.5
#: Bad ##orch lines of one attempt logged one by one; the rest are counted.
BAD_LINES_LOGGED = 5
#: Longest part of a bad line quoted in its log line.
BAD_LINE_QUOTE = 120
#: How often attempts are measured against ``max_memory``.
MEMORY_CHECK_S = 1.0


@dataclass(slots=True)
class Runtime:
    """The master's view of one shard beyond its lifecycle state."""

    life: lc.Shard
    handle: AttemptHandle | None = None
    logs: ShardLogs | None = None
    watch: Watch | None = None
    done: int | None = None
    total: int | None = None
    checkpoint: Any = None
    has_checkpoint: bool = False
    checkpoint_done: int | None = None
    heartbeat_at: float | None = None  # wall clock
    rss: int | None = None
    attempt_started: float = 0.0
    notes: list[str] = field(default_factory=list)
    bad_lines: int = 0  # malformed ##orch lines of the current attempt


def group_rss() -> dict[int, int]:
    """Process group id -> summed RSS in bytes of its live processes, from /proc/*/stat."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = procfs.stat_fields(int(name))
        try:
            pgrp, rss = int(fields[2]), int(fields[21]) * procfs.PAGE  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            continue
        out[pgrp] = out.get(pgrp, 0) + rss
    return out


class Tracking:
    """Mixed into ``Master``: everything a running attempt reports about itself."""

    rt: list[Runtime]
    loop: Loop
    store: Store
    shards: ShardList
    task: TaskConfig
    channel: Channel | None
    stale_messages: int
    unknown_messages: int
    _progress_dirty: set[int]
    _ids: dict[str, int]
    _acks: list[tuple[bytes, proto.Message]]
    view: Any
    apply: Callable[[int, lc.Event], None]
    _commit: Callable[[], None]
    flush_counters: Callable[[], None]

    def _check_memory(self) -> None:
        """Restart attempts over ``max_memory`` (pm2's max_memory_restart), reason ``memory``.

        An attempt's memory is the RSS of its whole process group (a shell
        script's children count), summed in one pass over /proc per check.
        """
        limit = self.task.max_memory_bytes
        if limit is None:
            return
        by_group = group_rss()
        for idx, rt in enumerate(self.rt):
            if rt.handle is None or rt.life.state is not State.RUNNING or rt.handle.pgid is None:
                continue
            rss = by_group.get(rt.handle.pgid)
            if rss is None:
                continue
            rt.rss = rss
            if rss > limit:
                reason = f"memory: rss {format_bytes(rss)} over max_memory {format_bytes(limit)}"
                self.view.event(f"shard {self.shards[idx].id}: {reason}")
                self.apply(idx, lc.Kill(Intent.MEMORY, reason))
        self.loop.timers.set("memory", self.loop.clock() + MEMORY_CHECK_S, self._check_memory)

    def _arm_watch(self, idx: int) -> None:
        watch = self.rt[idx].watch
        if watch is None or (idx, "watch") in self.loop.timers:
            return
        deadline = watch.next_deadline()
        if deadline is not None:
            self.loop.timers.set((idx, "watch"), deadline, lambda: self._check_watch(idx))

    def _check_watch(self, idx: int) -> None:
        rt = self.rt[idx]
        if rt.watch is None or rt.life.state is not State.RUNNING:
            return
        verdict = rt.watch.verdict(self.loop.clock())
        if verdict is None:
            self._arm_watch(idx)
            return
        intent, reason = verdict
        self.view.event(f"shard {self.shards[idx].id}: {reason}; killing attempt {rt.life.attempt}")
        self.apply(idx, lc.Kill(intent, reason))

    def _beat(self, idx: int, done: int | None, total: int | None, sdk: bool = True) -> None:
        rt = self.rt[idx]
        if done is not None:
            rt.done = done if rt.checkpoint_done is None else max(done, rt.checkpoint_done)
        if total is not None:
            rt.total = total
        rt.heartbeat_at = time.time()
        if rt.watch is not None:
            rt.watch.beat(self.loop.clock(), rt.done, rt.total, sdk=sdk)
            self._arm_watch(idx)
        if not self._progress_dirty:
            self.loop.timers.set(
                "progress", self.loop.clock() + PROGRESS_FLUSH_S, self._flush_progress
            )
        self._progress_dirty.add(idx)

    def _flush_one(self, idx: int) -> None:
        rt = self.rt[idx]
        self.store.set_progress_many([(rt.done, rt.total, rt.heartbeat_at, rt.rss, idx)])
        self._progress_dirty.discard(idx)

    def _flush_progress(self) -> None:
        rt = self.rt
        self.store.set_progress_many(
            (r.done, r.total, r.heartbeat_at, r.rss, idx)
            for idx in self._progress_dirty
            for r in (rt[idx],)
        )
        self._progress_dirty.clear()
        self.flush_counters()
        self.loop.call_when_idle(self._commit)

    def _current(self, shard_id: str, attempt: int) -> int | None:
        """The shard index when ``attempt`` is the shard's current one, else None (stale)."""
        idx = self._ids.get(shard_id)
        if idx is None:
            self.unknown_messages += 1  # a shard id this run does not have: forged or misrouted
            return None
        if self.rt[idx].life.attempt != attempt:
            self.stale_messages += 1
            return None
        return idx

    def on_message(self, identity: bytes, msg: proto.Message) -> None:
        idx = self._current(msg.shard, msg.attempt)
        if idx is None:
            if msg.kind in (proto.Kind.CHECKPOINT, proto.Kind.END) and self.channel is not None:
                self.channel.ack(identity, msg, ok=False, why="stale attempt: a newer one runs")
            return
        self._beat(idx, msg.done, msg.total)
        if msg.kind is proto.Kind.CHECKPOINT:
            self._store_checkpoint(idx, msg.checkpoint, msg.done)
            self._acks.append((identity, msg))
            self.loop.call_when_idle(self._commit)
        elif msg.kind is proto.Kind.END:
            self._flush_one(idx)
            self._acks.append((identity, msg))
            self.loop.call_when_idle(self._commit)
        if msg.rss is not None:
            self.rt[idx].rss = msg.rss

    def _store_checkpoint(self, idx: int, checkpoint: Any, done: int | None) -> None:
        rt = self.rt[idx]
        rt.checkpoint = checkpoint
        rt.has_checkpoint = True
        rt.checkpoint_done = done if done is not None else rt.done
        self.store.set_shard(
            idx,
            # Encoded here so that a JSON null is stored as "null", not as no checkpoint.
            checkpoint=orjson.dumps(checkpoint),
            checkpoint_done=rt.checkpoint_done,
            checkpoint_at=time.time(),
        )
        self._flush_one(idx)

    def _bad_line(self, idx: int, line: bytes, problem: str) -> None:
        """Say what is wrong with a ##orch line: in the shard's stderr log and in -v output,
        for the first few of an attempt (``bad_lines_summary`` counts the rest)."""
        rt = self.rt[idx]
        rt.bad_lines += 1
        if rt.bad_lines > BAD_LINES_LOGGED or rt.logs is None:
            return
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if len(text) > BAD_LINE_QUOTE:
            text = text[: BAD_LINE_QUOTE - 3] + "..."
        note = f"bad ##orch line: {problem}: {text!r}"
        rt.logs.err.note(stamp(), f"orch: {note}")
        if self.view.verbose:
            self.view.event(f"shard {self.shards[idx].id}: {note}")

    def bad_lines_summary(self, idx: int) -> None:
        """At the end of an attempt: how many bad ##orch lines were not logged one by one."""
        rt = self.rt[idx]
        more = rt.bad_lines - BAD_LINES_LOGGED
        if more > 0 and rt.logs is not None:
            note = f"{more} more bad ##orch line{'s' if more > 1 else ''} not shown"
            rt.logs.err.note(stamp(), f"orch: {note}")
            if self.view.verbose:
                self.view.event(f"shard {self.shards[idx].id}: {note}")
        rt.bad_lines = 0

    def _stdout_report(self, idx: int, handle: AttemptHandle, line: bytes) -> None:
        rt = self.rt[idx]
        if rt.handle is not handle:
            return
        try:
            report = proto.parse_line(line)
        except proto.ProtocolError as exc:
            self.store.add_counter("bad_stdout_lines", 1)
            self._bad_line(idx, line, str(exc))
            return
        if report is None:
            return
        done = report.done
        if report.advance is not None:
            # Saturate: a sum past 2**63-1 would overflow the store (and the master with it).
            done = min((rt.done or 0) + report.advance, proto.MAX_INT)
        self._beat(idx, done, report.total, sdk=False)
        if report.message is not None:
            self.store.set_shard(idx, message=report.message[:1000])
        if report.has_checkpoint:
            self._store_checkpoint(idx, report.checkpoint, rt.done)
            self.loop.call_when_idle(self._commit)
