"""``orch stop``, ``restart``, ``scale``, ``wait`` and ``resume``: steering a run from any terminal.

Steering verbs talk to the live master over its control socket; a run
whose master is gone gets a clear message (and ``orch resume`` as the way
forward), never a hang: every request has a short timeout.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.control import request
from orchestrator.errors import RET_OK, MasterUnreachable, OrchError, RunLost, WaitTimeout
from orchestrator.report import open_run, run_state
from orchestrator.show import find_run
from orchestrator.units import format_duration


def _live_endpoint(run_dir: str) -> tuple[str, str]:
    store = open_run(run_dir)
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


def _call(run_dir: str, op: str, **fields: Any) -> dict[str, Any]:
    run_id, endpoint = _live_endpoint(run_dir)
    reply = request(endpoint, op, **fields)
    if not reply.get("ok"):
        raise OrchError(f"run {run_id}: {reply.get('error', 'request refused')}")
    return reply


def stop(run_key: str, shard: str | None, home: str | None) -> int:
    run_dir = find_run(run_key, home)
    _call(run_dir, "stop", **({"shard": shard} if shard else {}))
    what = f"shard {shard}" if shard else "every shard"
    print(f"orch: stopping {what} of {os.path.basename(run_dir)}")
    return RET_OK


def restart(run_key: str, shard: str, home: str | None) -> int:
    run_dir = find_run(run_key, home)
    _call(run_dir, "restart", shard=shard)
    print(f"orch: restarting shard {shard} of {os.path.basename(run_dir)}")
    return RET_OK


def scale(run_key: str, jobs: int, home: str | None) -> int:
    run_dir = find_run(run_key, home)
    _call(run_dir, "scale", jobs=jobs)
    print(f"orch: {os.path.basename(run_dir)} now runs at most {jobs} shards at once")
    return RET_OK


def wait(run_key: str, home: str | None, timeout_s: float | None, poll_s: float = 0.1) -> int:
    """Block until the run ends; return its exit code. A lost run raises ``RunLost``
    (exit 1), a timeout ``WaitTimeout`` (exit 124, the run goes on)."""
    run_dir = find_run(run_key, home)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    store = open_run(run_dir)
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
    from orchestrator import environ
    from orchestrator.daemon import NothingToResume, detach, prepare_resume
    from orchestrator.start import compile_command, supervise
    from orchestrator.template import check_fields

    run_dir = find_run(run_key, home)
    try:
        run_id, task, shards, store, lock_fd = prepare_resume(run_dir, retry_failed)
    except NothingToResume as exc:
        print(f"orch: {exc}")
        if detach_:
            print(os.path.basename(run_dir))  # -d: the run id is always the last line
        return exc.exit_code
    try:
        if env:
            trial, _ = environ.for_master(run_dir, task)
            trial = dataclasses.replace(trial, env={**trial.env, **env})
            check_fields(compile_command(trial), shards)  # before anything is kept or started
            environ.add_env(run_dir, env)
        task, base_env = environ.for_master(run_dir, task)
    except BaseException:
        store.close()
        os.close(lock_fd)
        raise
    if detach_:
        store.close()
        return detach(run_id, run_dir, lock_fd, resume=True, retry_failed=retry_failed)
    try:
        return supervise(
            run_id,
            run_dir,
            task,
            shards,
            store,
            verbose=verbose,
            retry_failed=retry_failed,
            base_env=base_env,
        )
    finally:
        os.close(lock_fd)


def events(run_key: str, home: str | None) -> int:
    """Print the live run's shard state changes as JSON lines until it ends."""
    import sys

    import orjson

    from orchestrator.control import follow_events

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
