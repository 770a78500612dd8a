"""The heartbeat channel: one ZeroMQ ROUTER socket per run, bound on ipc://.

Shards connect DEALER sockets and send protocol messages (see
docs/protocol.md). The channel decodes and hands each valid message to the
master; garbage (wrong frame count, undecodable bytes, another run's id) is
dropped and counted, never raised. A frame over ``MAX_FRAME_BYTES`` never
gets here: ``ZMQ_MAXMSGSIZE`` makes ZeroMQ close its connection, uncounted
(docs/protocol.md, section 4).

ZeroMQ's notification fd is edge-triggered: after it wakes the loop the
socket is drained until empty (in bounded batches, resumed from the loop's
next iteration so that a flood never starves child exits or timers).

Wake-ups are coalesced: when the fd fires, the channel stops watching it
and drains ``COALESCE_S`` later, then watches again. A thousand shards
heartbeating once a second then cost ~100 loop iterations a second instead
of a thousand; heartbeat deadlines are seconds, so 10 ms is invisible.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import zmq

from orchestrator.loop import Loop
from shards.protocol import (
    MAX_FRAME_BYTES,
    Message,
    ProtocolError,
    decode,
    encode,
    heartbeat_fields,
)

BATCH = 4096
# Plain ints: pyzmq's enum flags cost an enum operation per use on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_RCVMORE, _NOBLOCK = int(zmq.RCVMORE), int(zmq.NOBLOCK)
COALESCE_S = 0.01
#: Queued messages per connection; a heartbeat is worth nothing once a newer one exists.
RCVHWM_PER_PEER = 1000
SOCKET_OPTIONS: dict[int, int] = {
    zmq.LINGER: 0,
    zmq.MAXMSGSIZE: MAX_FRAME_BYTES,
    zmq.RCVHWM: RCVHWM_PER_PEER,
}


def bind_ipc(kind: int, path: str, options: dict[int, int]) -> zmq.Socket[bytes]:
    """A socket of ``kind`` bound at ``ipc://path``, created 0600 (umask 077).

    A socket file left by a master that was killed is replaced.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(kind)
    for option, value in options.items():
        sock.setsockopt(option, value)
    if os.path.exists(path):
        os.unlink(path)
    old_umask = os.umask(0o077)
    try:
        sock.bind("ipc://" + path)
    finally:
        os.umask(old_umask)
    return sock


#: (identity, (shard, attempt, done, total, rss), loop clock read once per drain)
OnHeartbeat = Callable[[bytes, tuple[str, int, int | None, int | None, int | None], float], None]


def _unbound(identity: bytes, msg: Message) -> None:
    raise RuntimeError("a message arrived before the channel was bound to the master")


class Channel:
    """The local ``HeartbeatChannel`` (see orchestrator.ports)."""

    def __init__(
        self,
        loop: Loop,
        path: str,
        run_id: str,
        bound: tuple[zmq.Socket[bytes], str] | None = None,
    ) -> None:
        """Bind on ``ipc://path``, or take ``bound``: a socket a backend bound elsewhere
        (the CURVE TCP socket of ``orchestrator.curve``) and the endpoint shards use."""
        self._loop = loop
        self._run_id = run_id
        self._on_message: Callable[[bytes, Message], None] = _unbound
        self._on_heartbeat: OnHeartbeat | None = None
        self.path = path
        self.endpoint = "ipc://" + path
        self.received = 0
        self.garbage = 0
        self._scheduled = False
        if bound is not None:
            sock, self.endpoint = bound
        else:
            sock = bind_ipc(zmq.ROUTER, path, SOCKET_OPTIONS)
        self._sock = sock
        self._fd: int = int(sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
        self._watching = True
        self._last_drain = float("-inf")
        loop.add_reader(self._fd, self._wake)
        loop.call_when_idle(self.drain)

    def bind(self, on_message: Callable[[bytes, Message], None], on_heartbeat: OnHeartbeat) -> None:
        """Valid messages go to ``on_message``, valid heartbeats of this run to
        ``on_heartbeat`` (no ``Message`` built: the hot path)."""
        self._on_message = on_message
        self._on_heartbeat = on_heartbeat

    def _wake(self) -> None:
        """The fd fired: drain now if the socket was quiet, else a moment later.

        A message after a quiet stretch (a checkpoint between two pieces of
        work) is handled at once; under a steady stream the fd is set aside
        until ``COALESCE_S`` after the last drain, so drains come at most
        ~100 times a second, each taking everything that arrived meanwhile.
        """
        now = self._loop.clock()
        if now - self._last_drain >= COALESCE_S:
            self.drain()
            return
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
        self._loop.timers.set(("channel", self.path), self._last_drain + COALESCE_S, self.drain)

    def drain(self) -> None:
        """Handle up to BATCH messages; come back next iteration if more wait.

        The socket is read until ``zmq.Again`` (one exception per drain, no
        ``getsockopt`` per message). A ROUTER message always carries the
        identity frame and at least one more, so only the payload's
        ``RCVMORE`` is looked at. A heartbeat of this run takes the fast path
        (``heartbeat_fields``: no ``Message``) when the master bound one.
        """
        self._scheduled = False
        now = self._last_drain = self._loop.clock()
        sock = self._sock
        recv = sock.recv
        get = sock.getsockopt
        on_message = self._on_message
        on_heartbeat = self._on_heartbeat
        run_id = self._run_id
        if int(get(_EVENTS)) & _POLLIN:  # type: ignore[arg-type]
            for _ in range(BATCH):
                try:
                    identity = recv(_NOBLOCK)
                    frame = recv(_NOBLOCK)
                    if get(_RCVMORE):  # more than two frames: drop the rest
                        while get(_RCVMORE):
                            recv(_NOBLOCK)
                        self.garbage += 1
                        continue
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self.garbage += 1
                    continue
                if on_heartbeat is not None:
                    hb = heartbeat_fields(frame, run_id)
                    if hb is not None:
                        self.received += 1
                        on_heartbeat(identity, hb, now)
                        continue
                try:
                    msg = decode(frame)
                except ProtocolError:
                    self.garbage += 1
                    continue
                if msg.run != run_id:
                    self.garbage += 1
                    continue
                self.received += 1
                on_message(identity, msg)
            else:
                self._scheduled = True
                self._loop.call_when_idle(self.drain)
                return
        if not self._watching:
            self._loop.add_reader(self._fd, self._wake)
            self._watching = True

    def reply(self, identity: bytes, msg: Message) -> None:
        try:
            self._sock.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the shard is gone; it will time out on its own
        # Sending can consume the edge of the notification fd: look again.
        if not self._scheduled and int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # type: ignore[arg-type]
            self._scheduled = True
            self._loop.call_when_idle(self.drain)

    def close(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
        self._loop.timers.cancel(("channel", self.path))
        self._sock.close(0)
        if not self.endpoint.startswith("ipc://"):
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
