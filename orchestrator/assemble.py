"""Building a master: the one place that knows which ports a run gets.

``build_master`` makes the real edges of a local run (the guardian, the
event loop, the local backend, the heartbeat channel, the event feed and
the control server) and hands them to ``Master`` in one ``Ports`` value.
``orch run`` (start.py) and the detached master (daemon.py) both call it.

The run's ZeroMQ sockets (heartbeat channel, control server, event feed)
are bound after the first batch of attempts has been started and committed,
in the loop's second iteration (``LateSockets``): ``import zmq`` and three
binds are not in the way of the first spawns. Nothing is lost by the wait. The ipc
endpoints are paths known before binding, so every attempt gets its
``ORCH_ENDPOINT`` at once; a ZeroMQ DEALER (the SDK, a control client) that
connects before the bind keeps its messages queued and retries until the
socket exists; and no subscriber can know the event feed before the control
socket hands it out, so events published earlier have no one to miss them.

A new edge plugs in here and nowhere else: another backend is another
``Backend`` built in place of the local one (``--backend ray``: its own
channel binding, CURVE over TCP, no guardian, and taking back on resume the
attempts a previous master left alive); a notifier or any other listener of
shard and run state changes is one more ``EventSink`` in ``sinks``; the
master does not change.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.backends import Backend
from orchestrator.backends.local import LocalBackend
from orchestrator.concurrency import FDS_PER_ATTEMPT, default_jobs, fd_ceiling
from orchestrator.config import TaskConfig
from orchestrator.guardian import Guardian
from orchestrator.loop import Loop, raise_fd_limit
from orchestrator.master import Master
from orchestrator.ports import (
    EventSink,
    FanOut,
    Guard,
    HeartbeatChannel,
    NoGuard,
    OnHeartbeat,
    OnMessage,
    Ports,
    Steerable,
    View,
)
from orchestrator.runs import ipc_path
from orchestrator.sources import ShardList
from orchestrator.store import Store
from shards.protocol import Message

if TYPE_CHECKING:  # imported when the sockets are bound (LateSockets.open)
    from orchestrator.control import ControlServer, Events


def _ray_backend(loop: Loop, run_id: str, task: TaskConfig, store: Store) -> Backend:
    """The Ray backend for ``task`` (``import ray`` happens only on this path)."""
    from orchestrator.backends.ray import RayBackend, check_cluster

    cluster = check_cluster(task.ray_address)
    endpoint = str(store.run().get("endpoint") or "")
    # A resumed run binds the port its attempts (still alive, perhaps) know.
    port = int(endpoint.rpartition(":")[2]) if endpoint.startswith("tcp://") else 0
    return RayBackend(
        loop,
        cluster=cluster,
        run_id=run_id,
        heartbeat_timeout_s=task.heartbeat_timeout_s,
        stop_timeout_s=task.stop_timeout_s,
        num_cpus=task.shard_cpus,
        memory_bytes=task.shard_memory_bytes,
        resources=dict(task.resources),
        channel_port=port,
    )


class LateSockets:
    """The run's ZeroMQ sockets, bound by ``open()`` once the first attempts are started.

    Until then each stands in for its socket with what is known without it: the
    channel's and the control server's endpoints (ipc paths), nothing received, no
    reply to send (no attempt has been heard), events published to nobody.
    ``build_master`` queues ``open_soon()`` for the loop's first pass, which queues
    ``open()`` for the second: after ``Master.open()`` dispatched the first batch and
    the first pass committed it.
    """

    def __init__(
        self,
        loop: Loop,
        *,
        run_id: str,
        hb_path: str,
        control_path: str,
        events_path: str,
        channel: HeartbeatChannel | None = None,
    ) -> None:
        self._loop = loop
        self._run_id = run_id
        self._hb_path = hb_path
        self._control_path = control_path
        self._events_path = events_path
        self.opened = False
        self.channel = LateChannel("ipc://" + hb_path, channel)
        self.control = LateControl("ipc://" + control_path)
        self.events = LateEvents()

    def open_soon(self) -> None:
        """``open()`` in the loop's next pass: the current one commits what the first
        batch of attempts staged (so ``orch status`` sees them running) before the binds."""
        self._loop.call_when_idle(self.open)

    def open(self) -> None:
        """Import zmq and bind whatever is not bound yet (once)."""
        if self.opened:
            return
        self.opened = True
        from orchestrator.channel import Channel
        from orchestrator.control import ControlServer, Events

        if self.channel.real is None:
            self.channel.attach(Channel(self._loop, self._hb_path, self._run_id))
        feed = Events(self._events_path)
        self.events.attach(feed)
        self.control.attach(ControlServer(self._loop, self._control_path, feed.endpoint))


class LateChannel:
    """The ``HeartbeatChannel`` of a run until ``LateSockets.open()`` binds the real one
    (or, for a backend that bound its own, the real one from the start)."""

    def __init__(self, endpoint: str, real: HeartbeatChannel | None) -> None:
        self.endpoint = endpoint if real is None else real.endpoint
        self.real: HeartbeatChannel | None = None
        self._handlers: tuple[OnMessage, OnHeartbeat] | None = None
        if real is not None:
            self.attach(real)

    def attach(self, real: HeartbeatChannel) -> None:
        self.real = real
        if self._handlers is not None:
            real.bind(*self._handlers)

    @property
    def received(self) -> int:
        return self.real.received if self.real is not None else 0

    @received.setter
    def received(self, value: int) -> None:
        if self.real is not None:
            self.real.received = value

    @property
    def garbage(self) -> int:
        return self.real.garbage if self.real is not None else 0

    @garbage.setter
    def garbage(self, value: int) -> None:
        if self.real is not None:
            self.real.garbage = value

    def bind(self, on_message: OnMessage, on_heartbeat: OnHeartbeat) -> None:
        self._handlers = (on_message, on_heartbeat)
        if self.real is not None:
            self.real.bind(on_message, on_heartbeat)

    def reply(self, identity: bytes, msg: Message) -> None:
        if self.real is not None:  # before the bind no attempt has been heard: none to answer
            self.real.reply(identity, msg)

    def close(self) -> None:
        if self.real is not None:
            self.real.close()


class LateControl:
    """The ``ControlPort`` of a run until ``LateSockets.open()`` binds the real one; a
    client that connects meanwhile has its request answered once it is bound."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.real: ControlServer | None = None
        self._master: Steerable | None = None

    def attach(self, real: ControlServer) -> None:
        self.real = real
        if self._master is not None:
            real.bind(self._master)

    def bind(self, master: Steerable) -> None:
        self._master = master
        if self.real is not None:
            self.real.bind(master)

    def close(self) -> None:
        if self.real is not None:
            self.real.close()


class LateEvents:
    """The run's event feed (an ``EventSink``): events before the PUB socket is bound go
    to nobody, as they would to a PUB socket nobody has subscribed to yet."""

    def __init__(self) -> None:
        self.real: Events | None = None

    def attach(self, real: Events) -> None:
        self.real = real

    def publish(self, event: dict[str, Any]) -> None:
        if self.real is not None:
            self.real.publish(event)

    def close(self) -> None:
        if self.real is not None:
            self.real.close()


def build_master(
    *,
    run_id: str,
    run_dir: str,
    task: TaskConfig,
    shards: ShardList,
    store: Store,
    view: View | None = None,
    retry_failed: bool = False,
    sinks: Sequence[EventSink] = (),
    base_env: Mapping[str, str] | None = None,
    guardian: Guardian | None = None,
) -> Master:
    """A master for the opened run, with its local ports bound; call ``run()`` on it next.

    Changes the process's working directory to the task's ``cwd``. ``sinks`` receive
    every event the run's PUB feed publishes, in the same order.
    """
    if task.cwd:
        os.chdir(task.cwd)
    # The concurrency in force: `orch scale` records it, so a resumed run keeps it.
    jobs = default_jobs(len(shards), store.run().get("jobs") or task.jobs)
    _warn_past_fd_ceiling(min(jobs, len(shards)))
    hb_path = ipc_path(run_dir, run_id, "hb.sock")
    if task.backend == "ray":
        # Attempts on a cluster: the actors stop their own groups if the master dies (no
        # guardian), shards reach the master over TCP with CURVE, and a resumed master
        # takes back the attempts its predecessor left alive.
        guard: Guard = NoGuard()
        loop = Loop()
        backend: Backend = _ray_backend(loop, run_id, task, store)
        bound = backend.bind_channel(loop, run_dir)
        from orchestrator.channel import Channel

        channel: HeartbeatChannel | None = Channel(loop, hb_path, run_id, bound=bound)
        reattach = True
    else:
        # The guardian watches from before the first spawn (``guardian``: started by the
        # caller before it imported this module, see launch.early_guardian).
        guard = guardian if guardian is not None else Guardian(task.stop_timeout_s, run_id)
        loop = Loop()
        backend = LocalBackend(loop, stop_timeout_s=task.stop_timeout_s, jobs=jobs)
        channel = None  # bound by LateSockets.open()
        reattach = False
    sockets = LateSockets(
        loop,
        run_id=run_id,
        hb_path=hb_path,
        control_path=ipc_path(run_dir, run_id, "control.sock"),
        events_path=ipc_path(run_dir, run_id, "events.sock"),
        channel=channel,
    )
    # After Master.open() has started the first attempts and the loop's first pass has
    # committed them: bound in the second pass.
    loop.call_when_idle(sockets.open_soon)
    ports = Ports(
        loop=loop,
        backend=backend,
        channel=sockets.channel,
        control=sockets.control,
        events=FanOut([sockets.events, *sinks]),
        guardian=guard,
        reattach=reattach,
    )
    return Master(
        run_id=run_id,
        run_dir=run_dir,
        task=task,
        shards=shards,
        store=store,
        ports=ports,
        jobs=jobs,
        view=view,
        retry_failed=retry_failed,
        base_env=base_env,
    )


def _warn_past_fd_ceiling(live: int) -> None:
    """One line on stderr when ``--jobs`` asks for more live attempts than the open-files
    limit holds if every shard connects for heartbeats (libzmq aborts a process whose
    ``accept`` runs out of descriptors). Plain commands that never connect fit more, so
    this warns rather than refuses."""
    limit = raise_fd_limit()
    ceiling = fd_ceiling(limit)
    if live > ceiling:
        print(
            f"orch: warning: --jobs {live}: the open-files limit ({limit}) holds {ceiling} "
            f"live attempts whose shards send heartbeats ({FDS_PER_ATTEMPT} descriptors each, "
            "plus log files); past that the master can be stopped by 'Too many open files': "
            "raise the hard limit (ulimit -Hn) or lower --jobs",
            file=sys.stderr,
            flush=True,
        )
