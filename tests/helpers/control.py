"""Helpers for tests of detached runs, the control socket and resume (issue 4).

Builds on conftest.py (``Env``, ``poll_for``, ``run_pids``). What this adds:

- ``start_detached``: ``orch run -d`` and the run id from its last stdout line.
- ``Run``: one run's directory, database (read-only, polled directly: far
  cheaper than a CLI call per poll), master pid and control endpoint.
- ``ProcessSampler``: samples /proc for the live attempts of a run and
  records any instant where one shard had two live attempts.
- ``kill_everything``: teardown that SIGKILLs, by pid, every process that
  carries the test's ``ORCH_HOME`` in its environment: detached masters,
  their guardians, attempts and grandchildren. A detached master is not our
  child, so conftest's cleanup (which kills our children and the processes
  with ``ORCH_RUN_ID``) would miss it and its guardian.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import zmq

from helpers.reliability import alive, is_master, kill_home
from helpers.reliability import home_pids as home_pids  # re-exported for the tests
from helpers.world import Env, poll_for, run_pids
from orchestrator.store import Store


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the name: [state, ppid, pgrp, session, tty_nr, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].decode().split()


def environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def kill_everything(home: Path) -> None:
    """SIGKILL, by pidfd, every process of this test's home, masters first, until none is left."""
    kill_home(home)


def detached_env(tmp_path: Path) -> Iterator[Env]:
    """conftest's ``Env``, with a teardown that also reaches detached masters and guardians.

    Test modules wrap it as their ``denv`` fixture.
    """
    world = Env(tmp_path)
    try:
        yield world
    finally:
        try:
            world.cleanup()
        finally:
            kill_everything(world.home)


def start_detached(env: Env, *args: str) -> str:
    """``orch run -d ARGS``; returns the run id printed as the last line of stdout."""
    proc = env.orch("run", "-d", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    assert (env.home / "runs" / run_id).is_dir(), proc.stdout
    return run_id


class Run:
    """One run seen from outside: its files, its database, its master."""

    def __init__(self, env: Env, run_id: str) -> None:
        self.env = env
        self.id = run_id
        self.dir = env.home / "runs" / run_id
        self.db = self.dir / "state.db"

    def _store(self) -> Store:
        return Store.open(str(self.db), readonly=True)

    def row(self) -> dict[str, Any]:
        store = self._store()
        try:
            return store.run()
        finally:
            store.close()

    def shards(self) -> dict[str, dict[str, Any]]:
        store = self._store()
        try:
            return {s["id"]: s for s in store.shards()}
        finally:
            store.close()

    def states(self) -> dict[str, str]:
        return {k: s["state"] for k, s in self.shards().items()}

    def count(self, state: str) -> int:
        return sum(1 for s in self.states().values() if s == state)

    def attempts(self) -> dict[str, int]:
        return {k: s["attempts"] or 0 for k, s in self.shards().items()}

    def master_pid(self) -> int:
        """The pid in master.pid, checked against the database (the current master)."""
        pid = int((self.dir / "master.pid").read_text().strip())
        assert self.row()["master_pid"] == pid
        return pid

    def control(self) -> str:
        return str(self.row()["control"])

    def pids(self) -> list[int]:
        return run_pids(self.id, self.env.home)

    def kill_master(self, sig: int = signal.SIGKILL) -> int | None:
        """Signal the current master if it still lives (never a pid that is not an orch master)."""
        pid = self.master_pid()
        if not alive(pid) or not is_master(pid):
            return None
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return pid

    def wait_no_attempts(self, timeout: float = 10.0) -> float:
        """Poll until no process of the run is left; return how long it took (or fail)."""
        t0 = time.monotonic()
        assert poll_for(lambda: not self.pids(), timeout=timeout), (
            f"still alive after {timeout}s: {[(p, proc_stat(p)) for p in self.pids()]}"
        )
        return time.monotonic() - t0

    def integrity(self) -> str:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()


def control_request(endpoint: str, payload: bytes, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """Send one raw frame over a DEALER, as any client could; the decoded reply or None."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = orjson.loads(sock.recv())
    finally:
        sock.close(0)
    assert isinstance(reply, dict), reply
    return reply


class ProcessSampler:
    """Samples /proc every few ms for the run's live attempts, in a thread.

    A violation is an instant where two different attempts of one shard were
    both alive: seen in one scan and, after the scan, the older one still alive
    (so a process that ended while the scan went on is never counted).
    """

    def __init__(self, run_id: str, home: Path, interval_s: float = 0.01) -> None:
        self._needles = (b"ORCH_RUN_ID=" + run_id.encode(), b"ORCH_HOME=" + str(home).encode())
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples = 0
        self.max_live: dict[str, int] = {}
        self.violations: list[tuple[str, dict[int, list[int]]]] = []
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def scan(self) -> dict[str, dict[int, list[int]]]:
        """shard id -> attempt -> live pids."""
        seen: dict[str, dict[int, list[int]]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if not all(n in env for n in self._needles) or not alive(int(name)):
                continue
            fields = dict(e.partition(b"=")[::2] for e in env if b"=" in e)
            shard = fields.get(b"ORCH_SHARD_ID", b"?").decode()
            attempt = int(fields.get(b"ORCH_ATTEMPT", b"0"))
            seen.setdefault(shard, {}).setdefault(attempt, []).append(int(name))
        return seen

    @staticmethod
    def _still(pid: int, shard: str, attempt: int) -> bool:
        """The same attempt's process is still alive (not a reused pid)."""
        env = environ(pid)
        return (alive(pid) and env.get("ORCH_SHARD_ID") == shard
                and env.get("ORCH_ATTEMPT") == str(attempt))

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = self.scan()
            self.samples += 1
            for shard, by_attempt in seen.items():
                self.max_live[shard] = max(self.max_live.get(shard, 0), len(by_attempt))
                if len(by_attempt) > 1:
                    older = sorted(by_attempt)[:-1]
                    still = {a: [p for p in by_attempt[a] if self._still(p, shard, a)]
                             for a in older}
                    if any(still.values()):
                        self.violations.append((shard, by_attempt))
            self._stop.wait(self._interval_s)
