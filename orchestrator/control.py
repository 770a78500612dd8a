"""The control socket: a small versioned JSON request/reply API per run.

The master binds a ZeroMQ ROUTER at ``ipc://<run dir>/control.sock``
(mode 0600 in a 0700 directory). A client sends one frame, a JSON object
``{"v": 1, "op": ..., ...}``, and gets one frame back: ``{"v": 1, "ok":
true, ...}`` or ``{"v": 1, "ok": false, "error": "..."}``. Operations:

- ``ping``: ``{"pid": ...}``
- ``status``: live counts, jobs, items done/total
- ``stop``: ``{"shard": ID}`` stops one shard, without it the whole run
- ``restart``: ``{"shard": ID}``: a new attempt now, backoff reset; without
  ``shard``, every running shard (``{"restarting": N}``), and with
  ``{"rolling": K}`` at most K at a time, the next once a restarted one runs
  again
- ``scale``: below the number running, the newest surplus attempts are
  stopped (SIGTERM, grace) and go back to pending
- ``scale``: ``{"jobs": K}``: change concurrency live (K >= 1)
- ``subscribe``: ``{"events": ENDPOINT}``: a ZeroMQ PUB endpoint that
  publishes one JSON object per shard state change
  (``{"v": 1, "t": wall time, "shard": id, "index": i, "from": old, "state":
  new, "attempt": n, "reason": ...}``) and, last, ``{"v": 1, "run": state,
  "exit_code": code}``; ``orch events RUN`` prints them as JSON lines.

Every request is validated; garbage gets an error reply (or, if it is not
even a ZeroMQ envelope, is dropped and counted), never a crash. See
docs/protocol.md for the full reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import zmq

from orchestrator.channel import bind_ipc
from orchestrator.errors import MasterUnreachable
from orchestrator.loop import Loop
from orchestrator.ports import Steerable

CONTROL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
#: Largest ``scale`` accepted: what the state store can hold.
MAX_JOBS = 2**63 - 1


class ControlServer:
    """The local ``ControlPort`` (see orchestrator.ports); ``events`` is the endpoint that
    ``subscribe`` hands out."""

    def __init__(self, loop: Loop, path: str, events: str) -> None:
        self._loop = loop
        self._master: Steerable | None = None
        self._events = events
        self.path = path
        self.endpoint = "ipc://" + path
        self.garbage = 0
        sock = bind_ipc(zmq.ROUTER, path, {zmq.LINGER: 0, zmq.MAXMSGSIZE: MAX_REQUEST_BYTES})
        self._sock = sock
        self._fd: int = int(sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
        loop.add_reader(self._fd, self.drain)
        loop.call_when_idle(self.drain)
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.op_ping,
            "status": self.op_status,
            "stop": self.op_stop,
            "restart": self.op_restart,
            "scale": self.op_scale,
            "subscribe": self.op_subscribe,
        }

    def bind(self, master: Steerable) -> None:
        self._master = master

    @property
    def master(self) -> Steerable:
        assert self._master is not None, "bind() the control server to the master first"
        return self._master

    def drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.garbage += 1
                continue
            reply = self.handle(frames[-1])
            try:
                self._sock.send_multipart(
                    [frames[0], b"", orjson.dumps(reply)]
                    if len(frames) == 3 and frames[1] == b""
                    else [frames[0], orjson.dumps(reply)],
                    zmq.NOBLOCK,
                )
            except zmq.ZMQError:
                pass

    def handle(self, raw: bytes) -> dict[str, Any]:
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.garbage += 1
            return _error("request is not JSON")
        if not isinstance(req, dict):
            self.garbage += 1
            return _error("request must be a JSON object")
        version = req.get("v")
        if type(version) is not int or version != CONTROL_VERSION:
            return _error(
                f"unsupported version {req.get('v')!r} (this master speaks {CONTROL_VERSION})"
            )
        op = req.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error(f"unknown op {op!r} (known: {', '.join(self._ops)})")
        try:
            out = handler(req)
        except _BadRequest as exc:
            return _error(str(exc))
        return {"v": CONTROL_VERSION, "ok": True, **out}

    # --- operations -------------------------------------------------------------

    def _shard(self, req: dict[str, Any]) -> int | None:
        shard = req.get("shard")
        if shard is None:
            return None
        if not isinstance(shard, str):
            raise _BadRequest("'shard' must be a string id")
        idx = self.master.shard_index(shard)
        if idx is None:
            raise _BadRequest(f"no shard {shard!r} in this run")
        return idx

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "run": self.master.run_id}

    def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.master.status()

    def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        idx = self._shard(req)
        if idx is None:
            self.master.stop_all()
        else:
            self.master.stop_shard(idx)
        return {}

    def op_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        idx = self._shard(req)
        rolling = req.get("rolling")
        if rolling is not None and (type(rolling) is not int or not 1 <= rolling <= MAX_JOBS):
            raise _BadRequest(f"'rolling' must be an integer from 1 to {MAX_JOBS}")
        if idx is None:
            return {"restarting": self.master.restart_all(rolling)}
        if rolling is not None:
            raise _BadRequest("'rolling' restarts every running shard: give it without 'shard'")
        self.master.restart_shard(idx)
        return {}

    def op_scale(self, req: dict[str, Any]) -> dict[str, Any]:
        jobs = req.get("jobs")
        if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= MAX_JOBS:
            # Bounded: a larger number would overflow the store and take the master down.
            raise _BadRequest(f"'jobs' must be an integer from 1 to {MAX_JOBS}")
        self.master.scale(jobs)
        return {"jobs": jobs}

    def op_subscribe(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"events": self._events}

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._sock.close(0)
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Events:
    """The run's event feed, an ``EventSink``: a PUB socket; with no subscriber a publish
    costs little."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.endpoint = "ipc://" + path
        self._sock = bind_ipc(zmq.PUB, path, {zmq.LINGER: 200, zmq.SNDHWM: 100_000})

    def publish(self, event: dict[str, Any]) -> None:
        try:
            self._sock.send(orjson.dumps({"v": CONTROL_VERSION, **event}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a slow subscriber past its high-water mark misses events

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def follow_events(endpoint: str, control: str) -> Iterator[dict[str, Any]]:
    """Yield events until the run ends (``run`` event) or the master goes away."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    try:
        while True:
            if sock.poll(1000):
                event = orjson.loads(sock.recv())
                yield event
                if "run" in event:
                    return
            else:
                request(control, "ping")  # raises MasterUnreachable when it is gone
    finally:
        sock.close(0)


class _BadRequest(Exception):
    pass


def _error(text: str) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": False, "error": text}


def request(endpoint: str, op: str, timeout_s: float = 2.0, **fields: Any) -> dict[str, Any]:
    """Send one request to a live master; MasterUnreachable when it does not answer."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(orjson.dumps({"v": CONTROL_VERSION, "op": op, **fields}))
        if not sock.poll(int(timeout_s * 1000)):
            raise MasterUnreachable(
                f"the master at {endpoint} did not answer within {timeout_s:g}s"
            )
        reply = orjson.loads(sock.recv())
    finally:
        sock.close(0)
    if not isinstance(reply, dict):
        raise MasterUnreachable(f"the master at {endpoint} sent a malformed reply")
    return reply
