"""Building a master: the one place that knows which ports a run gets.

``build_master`` makes the real edges of a local run (the guardian, the
event loop, the local backend, the heartbeat channel, the event feed and
the control server) and hands them to ``Master`` in one ``Ports`` value.
``orch run`` (start.py) and the detached master (daemon.py) both call it.

A new edge plugs in here and nowhere else: another backend is another
``Backend`` built in place of the local one (``--backend ray``: its own
channel binding, CURVE over TCP, no guardian, and taking back on resume the
attempts a previous master left alive); a notifier or any other listener of
shard and run state changes is one more ``EventSink`` in ``sinks``; the
master does not change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from orchestrator.backends import Backend
from orchestrator.backends.local import LocalBackend
from orchestrator.channel import Channel
from orchestrator.concurrency import default_jobs
from orchestrator.config import TaskConfig
from orchestrator.control import ControlServer, Events
from orchestrator.guardian import Guardian
from orchestrator.loop import Loop
from orchestrator.master import Master
from orchestrator.ports import EventSink, FanOut, Guard, NoGuard, Ports, View
from orchestrator.runs import ipc_path
from orchestrator.sources import ShardList
from orchestrator.store import Store


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
) -> Master:
    """A master for the opened run, with its local ports bound; call ``run()`` on it next.

    Changes the process's working directory to the task's ``cwd``. ``sinks`` receive
    every event the run's PUB feed publishes, in the same order.
    """
    if task.cwd:
        os.chdir(task.cwd)
    # The concurrency in force: `orch scale` records it, so a resumed run keeps it.
    jobs = default_jobs(len(shards), store.run().get("jobs") or task.jobs)
    hb_path = ipc_path(run_dir, run_id, "hb.sock")
    if task.backend == "ray":
        # Attempts on a cluster: the actors stop their own groups if the master dies (no
        # guardian), shards reach the master over TCP with CURVE, and a resumed master
        # takes back the attempts its predecessor left alive.
        guardian: Guard = NoGuard()
        loop = Loop()
        backend: Backend = _ray_backend(loop, run_id, task, store)
        bound = backend.bind_channel(loop, run_dir)
        channel = Channel(loop, hb_path, run_id, bound=bound)
        reattach = True
    else:
        # Fork the guardian before any thread exists (the ZeroMQ context starts some).
        guardian = Guardian(task.stop_timeout_s, run_id)
        loop = Loop()
        backend = LocalBackend(loop, stop_timeout_s=task.stop_timeout_s, jobs=jobs)
        channel = Channel(loop, hb_path, run_id)
        reattach = False
    feed = Events(ipc_path(run_dir, run_id, "events.sock"))
    ports = Ports(
        loop=loop,
        backend=backend,
        channel=channel,
        control=ControlServer(loop, ipc_path(run_dir, run_id, "control.sock"), feed.endpoint),
        events=FanOut([feed, *sinks]),
        guardian=guardian,
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
