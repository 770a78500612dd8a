"""The master's edges: what it needs from the world, declared, and the value holding them.

The master talks to nothing directly. It starts and signals attempts
through a ``Backend``, hears shards through a ``HeartbeatChannel``, is
steered through a ``ControlPort``, tells the world about state changes
through an ``EventSink``, announces process groups to a ``Guard``, and
reads time from the loop's monotonic clock and from ``wall``. All of them
arrive in one ``Ports`` value built by ``orchestrator.assemble`` (the only
place that knows the real ones), so a test hands in fakes and a new edge (a
cluster backend, a notifier) plugs in there without touching the master.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.backends import Backend, Stream
from orchestrator.loop import Loop
from shards.protocol import Message

if TYPE_CHECKING:  # annotations only: the master is built on these ports
    from orchestrator.master import Master

#: ``on_message(identity, message)``: a decoded protocol message from a shard.
OnMessage = Callable[[bytes, Message], None]
#: ``on_heartbeat(identity, (shard, attempt, done, total, rss), now)``: a valid
#: heartbeat of this run, not made into a ``Message`` (the hot path); ``now`` is
#: the loop's clock, read once per batch.
OnHeartbeat = Callable[[bytes, tuple[str, int, int | None, int | None, int | None], float], None]


class HeartbeatChannel(Protocol):
    """Where shards' protocol messages arrive, and replies (acks) leave."""

    endpoint: str  # handed to every attempt as ORCH_ENDPOINT
    received: int  # valid messages so far
    garbage: int  # frames dropped as undecodable, misrouted or oversize

    def bind(self, on_message: OnMessage, on_heartbeat: OnHeartbeat) -> None:
        """Deliver every valid message to ``on_message`` from now on (inside the loop);
        a channel may hand heartbeats to ``on_heartbeat`` instead, not made into a
        ``Message`` (the hot path), or deliver them as messages too."""

    def reply(self, identity: bytes, msg: Message) -> None:
        """Send ``msg`` to the peer ``identity``; a peer that is gone is not an error."""

    def close(self) -> None: ...


class Steerable(Protocol):
    """What a control server may ask of the master."""

    run_id: str

    def shard_index(self, shard_id: str) -> int | None: ...
    def status(self) -> dict[str, Any]: ...
    def stop_all(self) -> None: ...
    def stop_shard(self, idx: int) -> None: ...
    def restart_shard(self, idx: int) -> None: ...
    def restart_all(self, rolling: int | None = None) -> int: ...
    def scale(self, jobs: int) -> None: ...


class ControlPort(Protocol):
    """Requests from ``orch stop/restart/scale/status`` (or a web server), run in the loop."""

    endpoint: str  # recorded in the store so that clients find it

    def bind(self, master: Steerable) -> None: ...
    def close(self) -> None: ...


class EventSink(Protocol):
    """Receives one dict per shard state change and, last, the run's end.

    A shard change is published when it is staged in the store, before the
    commit that records it; the run's end after its commit.
    """

    def publish(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RecordingSink(EventSink, Protocol):
    """A sink that writes into the run's store with the changes it follows (a notifier).

    Besides ``publish`` (shard changes, staged alongside them), the master calls
    ``ending(event)`` with the run's end before the commit that records it,
    ``committed()`` right after every commit, and ``tick(now)`` when the deadline it
    last returned (monotonic seconds; None: no timer) has come. None may block.
    """

    def ending(self, event: dict[str, Any]) -> None: ...
    def committed(self) -> None: ...
    def tick(self, now: float) -> float | None: ...


class Guard(Protocol):
    """Stops the run's process groups if the master dies without warning."""

    def watch(self, pgid: int) -> None: ...
    def forget(self, pgid: int) -> None: ...
    def flush(self) -> None:
        """Pass on what ``watch``/``forget`` queued: once per loop iteration."""

    def close(self, clean: bool = True) -> None: ...


class FanOut:
    """An ``EventSink`` that hands every event to several sinks (a PUB feed, a notifier),
    and the ``RecordingSink`` calls to the sinks that have them."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self.sinks = list(sinks)
        self._recording: list[RecordingSink] = [
            sink  # type: ignore[misc]
            for sink in self.sinks
            if all(callable(getattr(sink, m, None)) for m in ("ending", "committed", "tick"))
        ]

    def publish(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.publish(event)

    def ending(self, event: dict[str, Any]) -> None:
        for sink in self._recording:
            sink.ending(event)

    def committed(self) -> None:
        for sink in self._recording:
            sink.committed()

    def tick(self, now: float) -> float | None:
        """Every recording sink's tick; the earliest next deadline."""
        deadlines = [d for d in (sink.tick(now) for sink in self._recording) if d is not None]
        return min(deadlines, default=None)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class NoGuard:
    """A ``Guard`` for backends whose attempts are not the master's process groups."""

    def watch(self, pgid: int) -> None: ...
    def forget(self, pgid: int) -> None: ...
    def flush(self) -> None: ...
    def close(self, clean: bool = True) -> None: ...


@dataclass(slots=True)
class Ports:
    """Everything the master reaches the world through; built by ``assemble.build_master``."""

    loop: Loop  # fds, timers, signals, and the monotonic clock (``loop.clock``)
    backend: Backend
    channel: HeartbeatChannel
    control: ControlPort
    events: EventSink
    guardian: Guard
    wall: Callable[[], float] = time.time  # wall clock, only for what is recorded or shown
    rand: Callable[[], float] = random.random  # backoff jitter
    #: On start, ask the backend for attempts a previous master left alive (resume on a
    #: backend whose attempts outlive their master: ray); decided by assemble.
    reattach: bool = False

    def close(self) -> None:
        """Close every port, the loop last; process groups are left to the guardian only
        when attempts are still alive."""
        self.control.close()
        self.events.close()
        self.channel.close()
        self.backend.close()
        self.guardian.close(clean=not self.backend.live())
        self.loop.close()


class Reporter(Protocol):
    """What the master's parts tell the person watching (``View`` is one)."""

    verbose: bool

    def event(self, text: str) -> None:
        """A notable thing happened to a shard (a failure, a kill)."""

    def line(self, shard_id: str, stream: Stream, data: bytes) -> None:
        """Output of an attempt (shown with --verbose)."""


class View:
    """What the master tells the person watching; the base class says nothing.

    The command line hands one to the master (orchestrator.views.live has the
    terminal ones); ``started``, ``tick`` and ``finished`` read the master's figures.
    """

    def started(self, master: Master) -> None: ...
    def event(self, text: str) -> None: ...
    def line(self, shard_id: str, stream: Stream, data: bytes) -> None: ...
    def tick(self, master: Master) -> None: ...
    def finished(self, master: Master) -> None: ...

    verbose = False
    tick_s = 1.0
