"""The connection of one attempt to its master: a DEALER socket owned by one thread.

Split from the SDK's public surface (``shards/__init__.py``); see the
threading design there. Nothing here is public API.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from typing import Any

import zmq

from shards import EXIT_MASTER_GONE, Counters
from shards import protocol as p


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Exit status when the master is gone and SIGTERM did not end the process.
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
        curve: tuple[str, ...] | None = None,
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
        #: Over TCP (the ray backend) a refusal as stale means a newer attempt of this
        #: shard runs elsewhere: this one is fenced and stops its process group.
        self._fence = curve is not None
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        # Created here so a bad endpoint raises to the caller; the thread start
        # below is the memory barrier zmq requires to migrate a socket.
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)  # exit never waits on a dead master
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            if curve is not None:
                # A TCP channel (ray backend): CURVE with the run's keys (docs/protocol.md).
                server_key, public_key, secret_key = curve
                self._sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
                self._sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key.encode())
                self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
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
            kind, run, shard, attempt, self._seq,
            p.wire_count(done), p.wire_count(total), _rss_bytes(),
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
            if (
                self._fence
                and msg.kind is p.Kind.NACK
                and (msg.message or "").startswith("stale attempt")
            ):
                self._master_gone()
                return
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
