"""Building a master: the one place that knows which ports a run gets.

``build_master`` makes the real edges of a local run (the guardian, the
event loop, the local backend, the heartbeat channel, the event feed and
the control server) and hands them to ``Master`` in one ``Ports`` value.
``orch run`` (start.py) and the detached master (daemon.py) both call it.

A new edge plugs in here and nowhere else: another backend (a cluster
engine, with a TCP channel) is another ``Backend`` and ``HeartbeatChannel``
built in place of the local ones; a notifier or any other listener of
shard and run state changes is one more ``EventSink`` in ``sinks``; the
master does not change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from orchestrator.backends.local import LocalBackend
from orchestrator.channel import Channel
from orchestrator.concurrency import default_jobs
from orchestrator.config import TaskConfig
from orchestrator.control import ControlServer, Events
from orchestrator.guardian import Guardian
from orchestrator.loop import Loop
from orchestrator.master import Master
from orchestrator.ports import EventSink, FanOut, Ports, View
from orchestrator.runs import ipc_path
from orchestrator.sources import ShardList
from orchestrator.store import Store


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
    # Fork the guardian before any thread exists (the ZeroMQ context starts some).
    guardian = Guardian(task.stop_timeout_s, run_id)
    loop = Loop()
    feed = Events(ipc_path(run_dir, run_id, "events.sock"))
    ports = Ports(
        loop=loop,
        backend=LocalBackend(loop, stop_timeout_s=task.stop_timeout_s, jobs=jobs),
        channel=Channel(loop, ipc_path(run_dir, run_id, "hb.sock"), run_id),
        control=ControlServer(loop, ipc_path(run_dir, run_id, "control.sock"), feed.endpoint),
        events=FanOut([feed, *sinks]),
        guardian=guardian,
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
