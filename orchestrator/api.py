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

import orjson

from orchestrator.config import build_task
from orchestrator.runs import TASK_JSON, lock_run
from orchestrator.sources import load_shards

PICKLE = "task.pkl"


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
    from multiprocess.reduction import ForkingPickler

    from orchestrator.daemon import detach as start_detached
    from orchestrator.start import create_run, supervise

    if not callable(fn):
        raise TypeError(f"orchestrator.run needs a callable, not {type(fn).__name__}")
    buf = io.BytesIO()
    # recurse: also carry the globals the callable uses (a helper defined in the script).
    ForkingPickler(buf, recurse=True).dump(fn)
    payload = buf.getvalue()
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
    run_id, run_dir, store = create_run(task, shard_list, home=home, name=name)
    path = os.path.join(run_dir, PICKLE)
    with open(path, "wb") as f:
        f.write(payload)
    task = dataclasses.replace(task, call="@" + path)
    store.set_run(task_json=task.to_json())
    with open(os.path.join(run_dir, TASK_JSON), "wb") as f:
        f.write(
            orjson.dumps(
                {"task": task.to_json(), "source": shard_list.source}, option=orjson.OPT_INDENT_2
            )
        )
    store.commit()
    lock_fd = lock_run(run_dir)
    assert lock_fd is not None
    if detach:
        store.close()
        return start_detached(run_id, run_dir, lock_fd)
    try:
        return supervise(run_id, run_dir, task, shard_list, store, verbose=verbose)
    finally:
        os.close(lock_fd)
