"""``orch stop``, ``restart``, ``scale``, ``wait`` and ``resume``: steering a run from any terminal.

Steering verbs talk to the live master over its control socket; a run
whose master is gone gets a clear message (and ``orch resume`` as the way
forward), never a hang: every request has a short timeout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from orchestrator.control import follow_events, request
from orchestrator.errors import (
    RET_OK,
    MasterUnreachable,
    OrchError,
    RunLost,
    UsageError,
    WaitTimeout,
)
from orchestrator.runs import RunDir, find_run, run_state
from orchestrator.units import format_duration


def _live_endpoint(run_dir: RunDir) -> tuple[str, str]:
    store = run_dir.read()
    try:
        run = store.run()
    finally:
        store.close()
    state = run_state(run)
    if state == "lost":
        raise MasterUnreachable(
            f"run {run['id']} lost its master; 'orch resume {run['id']}' finishes it"
        )
    if state != "running" or not run.get("control"):
        raise OrchError(f"run {run['id']} is not running (it is {state})")
    return run["id"], run["control"]


def _call(run_dir: RunDir, op: str, **fields: Any) -> dict[str, Any]:
    run_id, endpoint = _live_endpoint(run_dir)
    reply = request(endpoint, op, **fields)
    if not reply.get("ok"):
        raise OrchError(f"run {run_id}: {reply.get('error', 'request refused')}")
    return reply


def stop(run_key: str, shard: str | None, home: str | None) -> int:
    run_dir = find_run(run_key, home)
    _call(run_dir, "stop", **({"shard": shard} if shard else {}))
    what = f"shard {shard}" if shard else "every shard"
    print(f"orch: stopping {what} of {run_dir.id}")
    return RET_OK


def restart(run_key: str, shard: str | None, home: str | None, rolling: int | None = None) -> int:
    run_dir = find_run(run_key, home)
    if shard is not None:
        if rolling is not None:
            raise UsageError("--rolling restarts every running shard: give it without --shard")
        _call(run_dir, "restart", shard=shard)
        print(f"orch: restarting shard {shard} of {run_dir.id}")
        return RET_OK
    reply = _call(run_dir, "restart", **({"rolling": rolling} if rolling is not None else {}))
    count = reply.get("restarting", 0)
    how = f", {rolling} at a time" if rolling is not None else ""
    print(f"orch: restarting {count} running shard{'s' if count != 1 else ''} of {run_dir.id}{how}")
    return RET_OK


def scale(run_key: str, jobs: int, home: str | None) -> int:
    run_dir = find_run(run_key, home)
    _call(run_dir, "scale", jobs=jobs)
    print(f"orch: {run_dir.id} now runs at most {jobs} shards at once")
    return RET_OK


def wait(run_key: str, home: str | None, timeout_s: float | None, poll_s: float = 0.1) -> int:
    """Block until the run ends; return its exit code. A lost run raises ``RunLost``
    (exit 1), a timeout ``WaitTimeout`` (exit 124, the run goes on)."""
    run_dir = find_run(run_key, home)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    store = run_dir.read()
    try:
        while True:
            run = store.run()
            state = run_state(run)
            if state == "lost":
                raise RunLost(
                    f"run {run['id']} lost its master; 'orch resume {run['id']}' finishes it"
                )
            if state != "running":
                code = run.get("exit_code")
                return int(code) if code is not None else 1
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"run {run['id']} still running after {format_duration(timeout_s or 0)}"
                )
            time.sleep(poll_s)
    finally:
        store.close()


def resume(
    run_key: str,
    home: str | None,
    detach_: bool,
    verbose: bool,
    retry_failed: bool = False,
    env: Mapping[str, str] | None = None,
) -> int:
    """Finish a run with the environment it started with (``--env`` entries win)."""
    # The master's stack is imported only here: the other verbs stay quick to start.
    from orchestrator import launch

    run_dir = find_run(run_key, home)
    try:
        run = launch.reopen(run_dir, retry_failed=retry_failed, env=env)
    except launch.NothingToResume as exc:
        print(f"orch: {exc}")
        if detach_:
            print(run_dir.id)  # -d: the run id is always the last line
        return exc.exit_code
    return launch.start(
        run, detach=detach_, verbose=verbose, resume=True, retry_failed=retry_failed
    )


def events(run_key: str, home: str | None) -> int:
    """Print the live run's shard state changes as JSON lines until it ends."""
    run_dir = find_run(run_key, home)
    reply = _call(run_dir, "subscribe")
    _, control = _live_endpoint(run_dir)
    try:
        for event in follow_events(reply["events"], control):
            sys.stdout.buffer.write(orjson.dumps(event) + b"\n")
            sys.stdout.flush()
    except MasterUnreachable:
        _live_endpoint(run_dir)  # says "lost ... orch resume" when the master died
        raise
    return RET_OK
