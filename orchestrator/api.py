"""Run a Python callable once per shard, from Python.

    import orchestrator

    rate = 0.2
    code = orchestrator.run(lambda shard: convert(shard.record, rate), shards="merchants.csv",
                            jobs=4, max_restarts=2)

The callable is serialised with the ``multiprocess`` package's pickler (dill),
so closures and lambdas built in a config script work; each attempt is a
child process (``python -m shards.runner @task.pkl``) supervised exactly like
a command: its own process group, logs, restarts, heartbeats, checkpoints.
Inside, the SDK is ready (``import shards``). Options are the orch.toml keys
(``jobs``, ``restart``, ``max_restarts``, ``stop_timeout``, ...).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from typing import Any

from orchestrator.config import build_task
from orchestrator.runs import OpenedRun, private
from orchestrator.sources import load_shards


def run(
    fn: Callable[[Any], Any],
    *,
    shards: str | None = None,
    split: int | None = None,
    range: str | None = None,  # noqa: A002 - the orch.toml key
    name: str | None = None,
    home: str | None = None,
    detach: bool = False,
    verbose: bool = False,
    **options: Any,
) -> int:
    """Run ``fn(shard_info)`` once per shard; return the run's exit code (or 0 when detached).

    Raises ``OrchError`` for bad input, before anything starts.
    """
    # The pickler and the master's stack are loaded only when a run is started from Python.
    from multiprocess.reduction import ForkingPickler

    from orchestrator import launch

    if not callable(fn):
        raise TypeError(f"orchestrator.run needs a callable, not {type(fn).__name__}")
    buf = io.BytesIO()
    # recurse: also carry the globals the callable uses (a helper defined in the script).
    ForkingPickler(buf, recurse=True).dump(fn)
    overrides = {
        "shards": shards,
        "split": split,
        "range": range,
        **options,
        "call": "orchestrator.api:placeholder",
    }
    task = build_task(
        name=name or getattr(fn, "__name__", "run").strip("<>") or "run",
        file_task=None,
        file_path=None,
        overrides=overrides,
        cwd=os.getcwd(),
    )
    if task.cwd is None:
        task = dataclasses.replace(task, cwd=os.getcwd())
    shard_list = load_shards(task.shards, split=task.split, range_=task.range, fmt=task.format)
    opened = OpenedRun.create(task, shard_list, home=home, name=name)
    with open(opened.dir.task_pickle, "wb", opener=private) as f:
        f.write(buf.getvalue())
    opened.set_task(dataclasses.replace(task, call="@" + opened.dir.task_pickle))
    return launch.start(opened, detach=detach, verbose=verbose)
