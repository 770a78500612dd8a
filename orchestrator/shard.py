"""One shard of a live run, as the master holds it: ``ShardRun``.

A ``ShardRun`` owns everything the master knows about one shard: its index
and id, its lifecycle value (``lifecycle.Shard``, replaced by each
``step``), its progress (done/total, last heartbeat, memory), its last
checkpoint, and its live attempt (handle, liveness watch, start time, the
stderr tail kept as notes) with the logs its attempts write to. The master
keeps one per shard in a list indexed like the store and the shard list;
nothing else holds per-shard state.

The record itself (the CSV row, the JSON object) stays in the shard list,
read when an attempt is started, so 100,000 shards cost little memory. The
master holds them in ``ShardRuns``: a shard that never started (pending, with
nothing stored about it) has no ``ShardRun`` until it is first asked for, so a
run of 100,000 shards at ``--jobs 100`` holds about a hundred of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import orjson

from orchestrator import lifecycle as lc
from orchestrator.backends import AttemptHandle
from orchestrator.lifecycle import State
from orchestrator.liveness import Watch
from orchestrator.logs import ShardLogs
from orchestrator.sources import ShardList

_FRESH = lc.Shard()
T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Live:
    """What a shard holds from its first attempt until it ends (``ShardRun.live``): the
    live attempt, the logs its attempts write to, the notes of the last failed one.

    Apart from ``ShardRun`` so that a shard that never started, or has ended,
    carries none of it (``ShardRun`` 120 bytes instead of 176).
    """

    handle: AttemptHandle | None = None
    watch: Watch | None = None
    watch_armed: bool = False  # the watch's timer is set (Tracker.arm_watch)
    started: float = 0.0  # monotonic
    notes: list[str] | None = None  # stderr tail of the last failed attempt
    bad_lines: int = 0  # malformed ##orch lines of the live attempt
    logs: ShardLogs | None = None  # open from the first attempt until the shard ends
    node: str | None = None  # where the live attempt runs (backends with nodes: ray)


class _LiveField(Generic[T]):
    """A ``ShardRun`` attribute kept in its ``Live``: the default while it has none; set
    to anything but the default, it gets one."""

    __slots__ = ("_default", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._default = getattr(Live(), name)

    @overload
    def __get__(self, run: None, owner: type[Any]) -> _LiveField[T]: ...

    @overload
    def __get__(self, run: ShardRun, owner: type[Any]) -> T: ...

    def __get__(self, run: ShardRun | None, owner: type[Any]) -> T | _LiveField[T]:
        if run is None:
            return self
        live = run.live
        return self._default if live is None else getattr(live, self._name)  # type: ignore[no-any-return]

    def __set__(self, run: ShardRun, value: T) -> None:
        live = run.live
        if live is None:
            default = self._default
            if value is default or (value == default and type(value) is type(default)):
                return
            live = run.live = Live()
        setattr(live, self._name, value)


@dataclass(slots=True, eq=False)
class ShardRun:
    index: int
    id: str
    life: lc.Shard
    # progress
    done: int | None = None
    total: int | None = None
    heartbeat_at: float | None = None  # wall clock
    rss: int | None = None
    # the last checkpoint
    checkpoint: Any = None
    has_checkpoint: bool = False  # a stored JSON null is a checkpoint too
    checkpoint_done: int | None = None
    # the live attempt and the logs, from the first attempt until the shard ends
    live: Live | None = None

    # ``Live``'s fields, read and written as the run's own (not dataclass fields).
    handle = _LiveField[AttemptHandle | None]("handle")
    watch = _LiveField[Watch | None]("watch")
    watch_armed = _LiveField[bool]("watch_armed")
    attempt_started = _LiveField[float]("started")
    notes = _LiveField[list[str] | None]("notes")
    bad_lines = _LiveField[int]("bad_lines")
    logs = _LiveField[ShardLogs | None]("logs")
    node = _LiveField[str | None]("node")

    @classmethod
    def from_row(cls, row: tuple[Any, ...], retry_failed: bool) -> ShardRun:
        """The shard as a (new or resumed) master takes it over from ``Store.resume_rows``.

        Whatever was not finished starts again, stopped shards too (a SIGTERM at
        reboot stops them all): done shards stay done, and failed ones too unless
        asked (``orch resume --retry-failed``). A checkpoint is kept either way.
        """
        idx, shard_id, state_text, attempts, reason, done, total, cp, cp_done, has_cp = row
        state = State(state_text)
        if not state.terminal or state is State.STOPPED or (retry_failed and state is State.FAILED):
            state = State.PENDING
        fresh = state is State.PENDING and not attempts and reason is None
        run = cls(
            index=idx,
            id=shard_id,
            # frozen: every shard not started yet shares one value (100,000 shards, one object)
            life=_FRESH if fresh else lc.Shard(state=state, attempt=attempts or 0, reason=reason),
            done=done if state.terminal else cp_done,
            total=total,
        )
        if has_cp or cp_done is not None:
            run.checkpoint, run.has_checkpoint, run.checkpoint_done = cp, has_cp, cp_done
        return run

    @property
    def state(self) -> State:
        return self.life.state

    def progress_row(self) -> tuple[int | None, int | None, float | None, int | None, int]:
        """The row ``Store.set_progress_many`` takes."""
        return self.done, self.total, self.heartbeat_at, self.rss, self.index

    def checkpoint_text(self) -> str:
        """The checkpoint as the JSON an attempt gets in ORCH_CHECKPOINT ("" for none)."""
        return orjson.dumps(self.checkpoint).decode() if self.has_checkpoint else ""

    def begin(self, handle: AttemptHandle, now: float, watch: Watch) -> None:
        """A new attempt runs: it starts from the last checkpoint's count."""
        live = self.live
        if live is None:
            live = self.live = Live()
        live.handle = handle
        live.watch = watch
        live.started = now
        live.notes = None
        live.bad_lines = 0
        live.node = None
        self.done = self.checkpoint_done

    def end(self) -> None:
        """The live attempt's process group is gone."""
        live = self.live
        if live is not None:
            live.handle = None
            live.watch = None

    def report(
        self, done: int | None, total: int | None, now: float, wall: float, sdk: bool = True
    ) -> None:
        """A heartbeat, with progress when it carries some; never below the checkpoint.
        ``sdk`` False: a ``##orch`` line, not a ZeroMQ message (``Watch.beat``)."""
        if done is not None:
            cp_done = self.checkpoint_done
            self.done = done if cp_done is None else max(done, cp_done)
        if total is not None:
            self.total = total
        self.heartbeat_at = wall
        live = self.live
        if live is not None and live.watch is not None:
            live.watch.beat(now, self.done, self.total, sdk=sdk)

    def keep_checkpoint(self, checkpoint: Any, done: int | None) -> None:
        """Hold ``checkpoint`` as the one the next attempt resumes from."""
        self.checkpoint = checkpoint
        self.has_checkpoint = True
        self.checkpoint_done = done if done is not None else self.done

    def close_logs(self) -> None:
        """The shard ended: its logs close, and what it held for its attempts goes."""
        live = self.live
        if live is not None:
            self.live = None
            if live.logs is not None:
                live.logs.close()

    def change_event(self, old: lc.Shard, t: float) -> dict[str, Any]:
        """What the event feed says about this shard's change from ``old`` to its state now."""
        new = self.life
        return {
            "t": t,
            "shard": self.id,
            "index": self.index,
            "from": old.state.value,
            "state": new.state.value,
            "attempt": new.attempt,
            "reason": new.reason,
            "intent": new.intent.value if new.intent is not None else None,
        }


class ShardRuns(Sequence[ShardRun]):
    """Every shard's ``ShardRun`` by index (``runs[i]`` is shard ``i``, like the store and
    the shard list), made on first use for a shard that never started.

    ``find`` looks a shard up by id through the shard list's own index (no second
    dict of 100,000 entries); ``cached`` maps the ids of the shards looked up by id
    while they held a slot (the ones that send heartbeats) to their runs, until they
    finish, for the heartbeat's fast path. Iterating makes every run; ``made`` walks
    only those made.
    """

    __slots__ = ("_runs", "_shards", "cached", "unmade")

    def __init__(self, shards: ShardList) -> None:
        self._shards = shards
        self._runs: list[ShardRun | None] = []
        #: Shard id -> run, for shards looked up by id while running (see ``forget``).
        self.cached: dict[str, ShardRun] = {}
        #: Shards with no ``ShardRun`` yet (pending, never started).
        self.unmade = 0

    def add(self, run: ShardRun) -> None:
        """The next shard's run (shard ``len(self)``)."""
        self._runs.append(run)

    def add_fresh(self) -> None:
        """The next shard never started: its run is made when first asked for."""
        self._runs.append(None)
        self.unmade += 1

    def __len__(self) -> int:
        return len(self._runs)

    @overload
    def __getitem__(self, i: int) -> ShardRun: ...

    @overload
    def __getitem__(self, i: slice) -> list[ShardRun]: ...

    def __getitem__(self, i: int | slice) -> ShardRun | list[ShardRun]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self._runs)))]
        run = self._runs[i]
        if run is None:
            if i < 0:
                i += len(self._runs)
            run = self._runs[i] = ShardRun(index=i, id=self._shards.id_at(i), life=_FRESH)
            self.unmade -= 1
        return run

    def __iter__(self) -> Iterator[ShardRun]:
        for i in range(len(self._runs)):
            yield self[i]

    def made(self) -> Iterator[ShardRun]:
        """The runs made so far, by index: the shards loaded with a past, and those used
        since (every shard not pending and never started is among them)."""
        return (run for run in self._runs if run is not None)

    def index_of(self, shard_id: str) -> int | None:
        """The index of the shard with id ``shard_id`` in this run, or None."""
        i = self._shards.index_of(shard_id)
        if i is None or i >= len(self._runs):
            return None
        run = self._runs[i]
        # A made run holds the store's id; an unmade one was checked against it at load.
        return i if run is None or run.id == shard_id else None

    def find(self, shard_id: str) -> ShardRun | None:
        """The run of the shard with id ``shard_id``, or None; cached while it holds a slot
        (and after, until it finishes)."""
        run = self.cached.get(shard_id)
        if run is not None:
            return run
        i = self.index_of(shard_id)
        if i is None:
            return None
        run = self[i]
        if run.life.state.holds_slot:  # running or stopping: heartbeats will follow
            self.cached[shard_id] = run
        return run

    def forget(self, run: ShardRun) -> None:
        """``run`` finished: it leaves the cache (looked up again if it ever restarts)."""
        self.cached.pop(run.id, None)
