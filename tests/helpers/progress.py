"""Helpers for test_progress.py: a run's database, its control socket and its raw channel.

These read what ``orch status`` reads (the run's SQLite database, opened
read-only) but without a CLI start per sample, so a test can watch a value
every few milliseconds while a shard runs. ``orch status --json`` itself is
still what each test asserts on at its checkpoints.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from helpers.world import Env, poll_for
from orchestrator import control
from orchestrator.errors import OrchError
from orchestrator.runs import STATE_DB
from orchestrator.store import Store
from shards import protocol as proto

#: Waits on a shard or a run that should take a second or two; generous for a loaded box.
DEADLINE_S = 20.0

#: Written by shard scripts that must wait for the test: ``wait_go()`` returns
#: once ``go`` exists next to the script, and exits 3 after a minute so that a
#: broken test never leaves a shard behind.
WAIT_GO = """\
import sys as _sys, time as _time
from pathlib import Path as _Path

def wait_go():
    go = _Path(__file__).parent / "go"
    deadline = _time.monotonic() + 60
    while not go.exists():
        if _time.monotonic() > deadline:
            _sys.exit(3)
        _time.sleep(0.01)  # allowed-sleep: deadline-bounded poll
"""


def db_path(env: Env, run_id: str) -> Path:
    return env.home / "runs" / run_id / STATE_DB


@contextmanager
def opened(env: Env, run_id: str) -> Iterator[Store]:
    store = Store.open(str(db_path(env, run_id)), readonly=True)
    try:
        yield store
    finally:
        store.close()


def run_row(env: Env, run_id: str) -> dict[str, Any]:
    with opened(env, run_id) as store:
        return store.run()


def shard_row(env: Env, run_id: str, idx: int = 0) -> dict[str, Any]:
    with opened(env, run_id) as store:
        row = store.shard(idx)
    assert row is not None
    return row


def attempts(env: Env, run_id: str, idx: int = 0) -> list[dict[str, Any]]:
    with opened(env, run_id) as store:
        return store.attempts(idx)


def wait_live(env: Env, timeout: float = DEADLINE_S) -> tuple[str, dict[str, Any]]:
    """The run id and run row once the master has bound its endpoints."""

    def live() -> tuple[str, dict[str, Any]] | None:
        runs = env.home / "runs"
        if not runs.exists():
            return None
        ids = sorted(p.name for p in runs.iterdir() if (p / STATE_DB).exists())
        if len(ids) != 1:
            return None
        try:
            row = run_row(env, ids[0])
        except OrchError:  # the database is being created
            return None
        return (ids[0], row) if row.get("endpoint") and row.get("control") else None

    found = poll_for(live, timeout)
    assert found, "the run never became live"
    return found


def wait_path(path: Path, timeout: float = DEADLINE_S) -> None:
    assert poll_for(path.exists, timeout), f"{path.name} never appeared"


def ask(env: Env, run_id: str, op: str, **fields: Any) -> dict[str, Any]:
    """One control request to the live master of ``run_id``."""
    reply = control.request(run_row(env, run_id)["control"], op, timeout_s=5.0, **fields)
    assert reply.get("ok"), reply
    return reply


def finish(env: Env, proc: subprocess.Popen[str], timeout: float = DEADLINE_S) -> int:
    """Wait for a background ``orch`` to exit; its output in the failure message if it hangs."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = (env.cwd / "orch.stdout").read_text(errors="replace")
        err = (env.cwd / "orch.stderr").read_text(errors="replace")
        raise AssertionError(f"orch did not end within {timeout}s\n{out}\n{err}") from None


def orch_output(env: Env) -> str:
    return (env.cwd / "orch.stdout").read_text(errors="replace") + (
        env.cwd / "orch.stderr"
    ).read_text(errors="replace")


@contextmanager
def dealer(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    """A DEALER connected to a run's heartbeat endpoint, as a shard (or an intruder) would."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)


def receive(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> proto.Message:
    assert sock.poll(int(timeout_s * 1000)), "no answer from the master"
    return proto.decode(sock.recv())


def frame(**fields: Any) -> bytes:
    """A raw JSON frame, for messages ``proto.encode`` would not produce."""
    return json.dumps(fields).encode()


def process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), or None once the pid is gone: pid reuse safe."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def pid_alive(pid: int, started: str) -> bool:
    return process_start(pid) == started
