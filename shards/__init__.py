"""The shard SDK: report progress and checkpoints to the orch master.

    import shards
    for row in shards.track(rows, total=n):    # +1 per item
        ...
    shards.advance(5)                          # relative, ~0.04 µs
    shards.progress(done, total=None)          # absolute
    shards.checkpoint({"page": 7})             # returns once the master stored it
    shards.last_checkpoint()                   # where this attempt resumes, or None
    shards.info()                              # ShardInfo for this attempt

Outside orch (no ORCH_ENDPOINT) every call is a harmless no-op, so the same
script runs by hand. Nothing happens at import: the first call reads the
environment and, inside orch, connects.

Threading design. ``advance()`` only adds to a slotted counter; one daemon
thread ("orch-sdk") owns the DEALER socket and is the only code that touches
it. It sends a HEARTBEAT every ORCH_HEARTBEAT_INTERVAL seconds, and an extra
one when progress changed, at most every PROGRESS_MIN_INTERVAL_S, so the
message rate is bounded however often ``advance()`` runs. ``checkpoint()`` and
the END at exit are routed through that thread: the caller queues a request
and writes a byte to a wake pipe the thread polls, then waits on an Event the
thread sets when the ACK/NACK with the request's seq arrives. One socket keeps
one identity at the master and keeps messages in order (END is always last).

The SDK installs no signal handlers. Master death is noticed through a pidfd
of ORCH_MASTER_PID (or ``kill(pid, 0)`` where pidfds are missing): the thread
sends SIGTERM to its process group and ``os._exit(75)`` 5 s later if the
process still lives. After ``fork()`` the child keeps counting locally but
never touches the parent's socket; processes the shard spawns see
ORCH_SDK_PID and stay unconnected, so one attempt is one connection.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from shards import protocol as p

if TYPE_CHECKING:
    from shards._link import Link

#: Exit status when the master is gone and SIGTERM did not end the process.
EXIT_MASTER_GONE = 75


class Counters:
    """The progress counters ``advance()`` adds to; read by the link thread."""

    __slots__ = ("done", "total")

    def __init__(self, done: int = 0, total: int | None = None) -> None:
        self.done = done
        self.total = total


__all__ = [
    "CheckpointError",
    "ShardInfo",
    "advance",
    "checkpoint",
    "info",
    "last_checkpoint",
    "progress",
    "track",
]

T = TypeVar("T")


class CheckpointError(Exception):
    """Raised when the master refuses a checkpoint (NACK) or does not acknowledge it in time."""


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """Who this attempt is; outside orch a placeholder (index 0 of 1, attempt 1)."""

    run_id: str = ""
    shard_id: str = "0"
    index: int = 0
    count: int = 1
    attempt: int = 1
    record: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None
    checkpoint_done: int = 0


class _Lazy:
    """Stands in for the counters until first use; touching it activates the SDK.

    ``advance()`` is ``_state.done += n``: the first call goes through these
    properties, which connect and rebind the module's ``_state`` to a plain
    slotted ``Counters``, so later calls pay nothing for the laziness.
    """

    @property
    def done(self) -> int:
        return _activate().done

    @done.setter
    def done(self, value: int) -> None:
        _activate().done = value

    @property
    def total(self) -> int | None:
        return _activate().total

    @total.setter
    def total(self, value: int | None) -> None:
        _activate().total = value


_state: Any = _Lazy()
_info: ShardInfo | None = None
_link: Link | None = None
_lock = threading.Lock()


def _warn(text: str) -> None:
    print(f"orch: {text}", file=sys.stderr, flush=True)


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        _warn(f"ignoring {name}={raw[:40]!r}: not an integer")
        return default


def _env_json(env: dict[str, str], name: str) -> tuple[bool, Any]:
    raw = env.get(name)
    if raw is None:
        return False, None
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        _warn(f"ignoring {name}: not valid JSON")
        return False, None


def _read_info(env: dict[str, str]) -> ShardInfo:
    has_record, record = _env_json(env, p.ENV_SHARD)
    if has_record and not isinstance(record, dict):
        _warn(f"ignoring {p.ENV_SHARD}: not a JSON object")
        record = {}
    has_cp, cp = _env_json(env, p.ENV_CHECKPOINT)
    return ShardInfo(
        run_id=env.get(p.ENV_RUN_ID, ""),
        shard_id=env.get(p.ENV_SHARD_ID, "0"),
        index=_env_int(env, p.ENV_SHARD_INDEX, 0),
        count=_env_int(env, p.ENV_SHARD_COUNT, 1),
        attempt=_env_int(env, p.ENV_ATTEMPT, 1),
        record=record if has_record else {},
        checkpoint=cp if has_cp else None,
        checkpoint_done=max(0, _env_int(env, p.ENV_CHECKPOINT_DONE, 0)) if has_cp else 0,
    )


def _activate() -> Counters:
    """Read the environment once, connect when inside orch, and return the live counters."""
    global _state, _info, _link
    with _lock:
        if isinstance(_state, Counters):
            return _state
        env = dict(os.environ)
        _info = _read_info(env)
        counters = Counters(_info.checkpoint_done)
        owner = env.get(p.ENV_SDK_PID)
        endpoint = env.get(p.ENV_ENDPOINT)
        if endpoint and (owner is None or owner == str(os.getpid())):
            _link = _connect(endpoint, env, _info, counters)
        _state = counters
        return counters


def _connect(endpoint: str, env: dict[str, str], me: ShardInfo, counters: Counters) -> Link | None:
    if p.ENV_RUN_ID not in env or p.ENV_SHARD_ID not in env or p.ENV_ATTEMPT not in env:
        _warn(
            f"ignoring {p.ENV_ENDPOINT}: {p.ENV_RUN_ID}, {p.ENV_SHARD_ID} or {p.ENV_ATTEMPT} unset"
        )
        return None
    try:
        interval_s = float(env.get(p.ENV_HEARTBEAT_INTERVAL, "1.0"))
    except ValueError:
        interval_s = 1.0
    if not 0.0 < interval_s < 3600.0:
        interval_s = 1.0
    master_pid = _env_int(env, p.ENV_MASTER_PID, 0) or None
    import zmq  # only inside orch: `import shards` (and shards.protocol) stays light

    from shards._link import Link

    try:
        keys = (p.ENV_CURVE_SERVER, p.ENV_CURVE_PUBLIC, p.ENV_CURVE_SECRET)
        curve = tuple(env.get(k, "") for k in keys)
        link = Link(
            endpoint, me.run_id, me.shard_id, me.attempt, counters, interval_s, master_pid,
            curve=curve if all(curve) else None,
        )  # fmt: skip
    except (zmq.ZMQError, OSError) as exc:  # a bad endpoint must not crash the user's work
        _warn(f"cannot connect to {endpoint!r}: {exc}")
        return None
    os.environ[p.ENV_SDK_PID] = str(os.getpid())
    atexit.register(_at_exit)
    return link


def _at_exit() -> None:
    link = _link
    if link is not None and link.pid == os.getpid():
        link.finish(timeout_s=2.0)


def _after_fork_in_child() -> None:
    # A child of a connected process must never touch the parent's socket or
    # thread (the thread does not exist in it, and the attempt already has its
    # connection): it keeps its copy of the counters, already activated, so it
    # never connects. The parent's Link stays referenced so that no zmq object
    # is finalised in the child. A child of a process that had not used the SDK
    # yet (e.g. the master, which imports shards.protocol) is left alone.
    global _link
    if _link is not None:
        _fork_orphans.append(_link)
        _link = None


_fork_orphans: list[Link] = []
os.register_at_fork(after_in_child=_after_fork_in_child)


def advance(n: int = 1) -> None:
    """Add ``n`` to this shard's progress. An in-process increment; never blocks.

    Not atomic across threads: count in one thread, or use ``progress()``.
    """
    _state.done += n


def progress(done: int, total: int | None = None) -> None:
    """Set this shard's progress to ``done`` (absolute), and its total when given."""
    state = _state if isinstance(_state, Counters) else _activate()
    if done < 0 or (total is not None and total < 0):
        raise ValueError("progress counts must be non-negative")
    if total is not None:
        state.total = total
    state.done = done


def track(iterable: Iterable[T], total: int | None = None) -> Iterator[T]:
    """Yield the items of ``iterable``, adding 1 to the progress as each is handed out.

    The item being processed is already counted, so a ``checkpoint()`` taken
    at the end of the loop body covers it, and the count is exact when the loop
    ends or breaks. ``total`` defaults to the progress at the start plus
    ``len(iterable)`` when the iterable has a length (a resumed loop over the
    remaining rows still ends at its total).
    """
    state = _state if isinstance(_state, Counters) else _activate()
    if total is None:
        try:
            total = state.done + len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if total is not None:
        state.total = total
    return _tracked(iterable, state)


def _tracked(iterable: Iterable[T], state: Counters) -> Iterator[T]:
    for item in iterable:
        state.done += 1
        yield item


def checkpoint(state: Any, *, timeout_s: float = 10.0) -> None:
    """Store ``state`` with the current progress; return once the master has it durably.

    ``state`` must be JSON-serialisable (TypeError otherwise). Raises
    CheckpointError when the master refuses it or does not acknowledge it
    within ``timeout_s``. Afterwards ``last_checkpoint()`` returns the state as
    a resumed attempt will see it (JSON round-tripped). Outside orch only that
    local effect happens.
    """
    counters = _state if isinstance(_state, Counters) else _activate()
    try:
        body = orjson.dumps(state)
    except TypeError as exc:
        raise TypeError(f"checkpoint state must be JSON-serialisable: {exc}") from None
    if len(body) > p.MAX_FRAME_BYTES - 4096:
        raise ValueError(f"checkpoint state is {len(body)} bytes as JSON; the limit is ~1 MiB")
    saved = orjson.loads(body)
    done, total = counters.done, counters.total
    link = _link
    if link is not None and link.pid == os.getpid():
        reply = link.request(p.Kind.CHECKPOINT, done, total, saved, timeout_s)
        if reply is None:
            raise CheckpointError(
                f"master did not acknowledge the checkpoint within {timeout_s:g}s"
            )
        if reply.kind is p.Kind.NACK:
            raise CheckpointError(reply.message or "master refused the checkpoint")
    global _info
    assert _info is not None
    _info = dataclasses.replace(_info, checkpoint=saved, checkpoint_done=p.wire_count(done) or 0)


def last_checkpoint() -> Any:
    """Return the checkpoint this attempt should resume from (or its own latest), or None."""
    return info().checkpoint


def info() -> ShardInfo:
    """Return this attempt's identity and shard record."""
    if _info is None:
        _activate()
    assert _info is not None
    return _info
