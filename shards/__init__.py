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
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import zmq

from shards import protocol as p

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


class Counters:
    """The progress counters ``advance()`` adds to; read by the link thread."""

    __slots__ = ("done", "total")

    def __init__(self, done: int = 0, total: int | None = None) -> None:
        self.done = done
        self.total = total


def _count(value: Any) -> int | None:
    """Coerce a counter for the wire (a caller may have advanced by a float)."""
    if value is None:
        return None
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Exit status when the master is gone and SIGTERM did not end the process.
EXIT_MASTER_GONE = 75
_MASTER_GONE_GRACE_S = 5.0


class _Request:
    """A message the caller wants sent, and the slot its ACK/NACK lands in."""

    __slots__ = ("checkpoint", "done", "event", "kind", "reply", "total")

    def __init__(self, kind: p.Kind, done: Any, total: Any, cp: Any) -> None:
        self.kind, self.done, self.total, self.checkpoint = kind, done, total, cp
        self.event = threading.Event()
        self.reply: p.Message | None = None


class Link:
    """The connection of one attempt: a DEALER socket owned by one daemon thread."""

    def __init__(
        self,
        endpoint: str,
        run: str,
        shard: str,
        attempt: int,
        counters: Counters,
        interval_s: float,
        master_pid: int | None,
    ) -> None:
        self.pid = os.getpid()
        self.sent = 0  # messages handed to zmq; read by bench/
        self._ids = (run, shard, attempt)
        self._counters = counters
        self._interval_s = interval_s
        self._master_pid = master_pid
        self._master_pgid: int | None = None
        self._pidfd: int | None = None
        self._gone = False
        self._stop = False
        self._seq = 0
        self._pending: dict[int, _Request] = {}
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        # Created here so a bad endpoint raises to the caller; the thread start
        # below is the memory barrier zmq requires to migrate a socket.
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)  # exit never waits on a dead master
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError:
            self._sock.close(0)
            self._ctx.term()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if master_pid is not None:
            self._watch_master(master_pid)
        self._thread = threading.Thread(target=self._run, name="orch-sdk", daemon=True)
        self._thread.start()

    def _watch_master(self, pid: int) -> None:
        try:
            self._master_pgid = os.getpgid(pid)
        except OSError:
            pass
        try:
            self._pidfd = os.pidfd_open(pid)  # a reused pid can never be mistaken
        except ProcessLookupError:
            self._gone = True  # acted on as soon as the thread runs
        except (OSError, AttributeError):
            self._pidfd = None  # no pidfds here: fall back to kill(pid, 0)

    def request(
        self, kind: p.Kind, done: Any, total: Any, cp: Any, timeout_s: float
    ) -> p.Message | None:
        """Send a message that needs an answer; return the ACK/NACK, or None on timeout."""
        if self._gone or not self._thread.is_alive():
            return None
        req = _Request(kind, done, total, cp)
        self._queue.put(req)
        self._wake()
        req.event.wait(timeout_s)
        return req.reply

    def finish(self, timeout_s: float) -> None:
        """Send END with the final counts, wait for its ACK, and stop the thread."""
        if self._stop:
            return
        c = self._counters
        self.request(p.Kind.END, c.done, c.total, None, timeout_s)
        if self._gone:
            return  # the thread is busy ending the process
        self._stop = True
        self._wake()
        self._thread.join(0.5)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the thread is awake anyway

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - report any bug; the master sees beats stop
            print(f"orch: shard SDK thread failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            if not self._gone:
                self._sock.close(0)
                self._ctx.term()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._pidfd is not None:
            poller.register(self._pidfd, zmq.POLLIN)  # readable once the master exits
        min_gap_s = p.PROGRESS_MIN_INTERVAL_S
        now = time.monotonic()
        last_progress = self._send(p.Kind.HEARTBEAT, None)
        last_sent = now
        next_beat = now + self._interval_s
        while not self._stop:
            if self._gone or (self._pidfd is None and not self._master_alive()):
                self._master_gone()
                return
            wait_s = max(0.0, min(next_beat - now, min_gap_s))
            events = dict(poller.poll(int(wait_s * 1000.0) + 1))
            if self._pidfd is not None and self._pidfd in events:
                self._gone = True
                continue
            if self._sock in events:
                self._receive()
            if self._wake_r in events:
                while os.read(self._wake_r, 512) == 512:
                    pass
                while not self._queue.empty():
                    req = self._queue.get()
                    last_progress = self._send(req.kind, req)
                    last_sent = time.monotonic()
            now = time.monotonic()
            c = self._counters
            changed = (c.done, c.total) != last_progress
            if now >= next_beat or (changed and now - last_sent >= min_gap_s):
                last_progress = self._send(p.Kind.HEARTBEAT, None)
                last_sent = now
                next_beat = now + self._interval_s

    def _send(self, kind: p.Kind, req: _Request | None) -> tuple[Any, Any]:
        """Send one message with the current (or the request's) counts; return them."""
        c = self._counters
        done, total = (c.done, c.total) if req is None else (req.done, req.total)
        self._seq += 1
        run, shard, attempt = self._ids
        cp = None if req is None else req.checkpoint
        msg = p.Message(
            kind, run, shard, attempt, self._seq, _count(done), _count(total), _rss_bytes(),
            cp, kind is p.Kind.CHECKPOINT,
        )  # fmt: skip
        try:
            frame = p.encode(msg)
        except (p.ProtocolError, TypeError) as exc:  # e.g. ids make the frame too large
            if req is not None:
                req.reply = p.Message(p.Kind.NACK, run, shard, attempt, self._seq, message=str(exc))
                req.event.set()
            return done, total
        if req is not None:
            self._pending[self._seq] = req
        try:
            self._sock.send(frame, zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            pass  # queue full (master away for minutes): a waiting caller times out
        return done, total

    def _receive(self) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = p.decode(frame)
            except p.ProtocolError:
                continue
            if msg.kind is p.Kind.ACK or msg.kind is p.Kind.NACK:
                req = self._pending.pop(msg.seq, None)
                if req is not None:
                    req.reply = msg
                    req.event.set()

    def _master_alive(self) -> bool:
        if self._master_pid is None:
            return True
        try:
            os.kill(self._master_pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # EPERM: it exists
        return True

    def _master_gone(self) -> None:
        """No orphan keeps working: SIGTERM our process group, then exit 75 if still alive."""
        self._gone = True
        try:
            if self._master_pgid == os.getpgrp():
                os.kill(os.getpid(), signal.SIGTERM)  # not our group to signal
            else:
                os.killpg(os.getpgrp(), signal.SIGTERM)
        except OSError:
            pass
        threading.Event().wait(_MASTER_GONE_GRACE_S)
        os._exit(EXIT_MASTER_GONE)


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
    try:
        link = Link(endpoint, me.run_id, me.shard_id, me.attempt, counters, interval_s, master_pid)
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
    _info = dataclasses.replace(_info, checkpoint=saved, checkpoint_done=_count(done) or 0)


def last_checkpoint() -> Any:
    """Return the checkpoint this attempt should resume from (or its own latest), or None."""
    return info().checkpoint


def info() -> ShardInfo:
    """Return this attempt's identity and shard record."""
    if _info is None:
        _activate()
    assert _info is not None
    return _info
