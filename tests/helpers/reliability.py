"""Helpers of the reliability suites: processes, runs, a /proc sampler.

Builds on ``helpers.world`` (``Env``, ``run_orch``, ``poll_for``, ``run_pids``).

Safety rules every helper follows:

- A process is only ever signalled after it was opened as a pidfd and its
  environment was checked to carry this test's ``ORCH_HOME`` (and, for
  attempts, the run's ``ORCH_RUN_ID``): the signal goes through the pidfd,
  so a pid reused in between can never be hit.
- Nothing is signalled by name or by process group.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import zmq

from helpers.world import ORCH, PYTHON, Env, orch_env, poll_for, run_orch, run_pids, start_orch

__all__ = ["ORCH", "PYTHON", "Env", "orch_env", "poll_for", "run_orch", "run_pids", "start_orch"]


#: Deadlines are generous: other suites load the same two cores.
DEADLINE_S = 60.0


# --- /proc ------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def environ(pid: int) -> dict[bytes, bytes] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key] = value
    return out


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def home_pids(home: Path) -> list[int]:
    """Live processes whose environment has ``ORCH_HOME=home`` (never this process)."""
    want = str(home).encode()
    me = os.getpid()
    out = []
    for pid in _pids():
        if pid == me:
            continue
        env = environ(pid)
        if env is not None and env.get(b"ORCH_HOME") == want and alive(pid):
            out.append(pid)
    return out


def signal_verified(pid: int, signum: int, needles: dict[bytes, bytes],
                    starttime: int | None = None) -> bool:
    """Send ``signum`` to ``pid`` only if it still carries every ``needles`` entry (and
    started at ``starttime`` when given); through a pidfd, so a reused pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        env = environ(pid)
        if env is None or any(env.get(k) != v for k, v in needles.items()):
            return False
        if starttime is not None:
            st = proc_stat(pid)
            if st is None or st[3] != starttime:
                return False
        signal.pidfd_send_signal(fd, signum)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_home(home: Path) -> None:
    """SIGKILL every process of this test's home, masters first, until none is left."""
    needles = {b"ORCH_HOME": str(home).encode()}
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        pids = home_pids(home)
        if not pids:
            return
        for pid in sorted(pids, key=lambda p: not is_master(p)):  # no master restarts one
            signal_verified(pid, signal.SIGKILL, needles)
        poll_for(lambda: not home_pids(home), timeout=1.0)


def is_master(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"orchestrator.daemon" in argv or any(a.endswith(b"/orch") for a in argv[:2])


# --- a run seen from outside --------------------------------------------------------------


class Run:
    """One run's directory and database (read-only, polled directly: cheaper than the CLI)."""

    def __init__(self, env: Any, run_id: str) -> None:
        self.env = env
        self.id = run_id
        self.dir = env.home / "runs" / run_id
        self.db = self.dir / "state.db"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10.0)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def row(self) -> dict[str, Any]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10.0)
        try:
            cur = conn.execute("SELECT * FROM run")
            names = [d[0] for d in cur.description]
            return dict(zip(names, cur.fetchone(), strict=True))
        finally:
            conn.close()

    def shards(self) -> dict[str, dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10.0)
        try:
            cur = conn.execute("SELECT * FROM shards ORDER BY idx")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        finally:
            conn.close()
        for r in rows:
            r["checkpoint"] = orjson.loads(r["checkpoint"]) if r["checkpoint"] else None
        return {r["id"]: r for r in rows}

    def integrity(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        return run_pids(self.id, self.env.home)

    def kill_master(self, pid: int | None = None) -> bool:
        """SIGKILL the run's current master (verified: an orch master of this home)."""
        pid = pid if pid is not None else self.master_pid()
        if pid is None or not is_master(pid):
            return False
        return signal_verified(pid, signal.SIGKILL, {b"ORCH_HOME": str(self.env.home).encode()})


def wait_run(env: Any, timeout: float = DEADLINE_S) -> Run:
    """The one run of ``env`` once its master has recorded itself running with endpoints."""
    def ready() -> Run | None:
        runs = env.home / "runs"
        ids = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
        if len(ids) != 1 or not (runs / ids[0] / "state.db").exists():
            return None
        run = Run(env, ids[0])
        try:
            row = run.row()
        except sqlite3.Error:
            return None
        return run if row["state"] == "running" and row["control"] else None

    run = poll_for(ready, timeout=timeout)
    if run is None:
        runs = env.home / "runs"
        rows = []
        for d in sorted(runs.iterdir()) if runs.exists() else []:
            try:
                rows.append(Run(env, d.name).row())
            except sqlite3.Error as exc:
                rows.append({"id": d.name, "error": str(exc)})
        out = ""
        for name in ("orch.stdout", "orch.stderr"):
            if (env.cwd / name).exists():
                out += (env.cwd / name).read_text()[-2000:]
        raise AssertionError(f"the run did not start: {rows}\n{out}")
    return run


def control(endpoint: str, payload: bytes | dict[str, Any], timeout_s: float = 5.0) -> Any:
    """One request on the control socket; the decoded reply, or None without one in time."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload if isinstance(payload, bytes) else orjson.dumps(payload))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return orjson.loads(sock.recv())
    finally:
        sock.close(0)


def status(run: Run, timeout_s: float = 5.0) -> dict[str, Any]:
    reply = control(str(run.row()["control"]), {"v": 1, "op": "status"}, timeout_s)
    assert reply is not None and reply.get("ok"), reply
    return dict(reply)


# --- sampling /proc for overlapping attempts ---------------------------------------------------


class ProcTable:
    """The live processes of one run's attempts, read from /proc.

    A process's identity (shard, attempt) comes from its environment, read once per
    (pid, start time) and cached, so a scan costs one small read per process.
    """

    def __init__(self, run_id: str, home: Path) -> None:
        self._run = run_id.encode()
        self._home = str(home).encode()
        self._known: dict[tuple[int, int], tuple[str, int] | None] = {}

    def _identity(self, pid: int, starttime: int) -> tuple[str, int] | None:
        key = (pid, starttime)
        if key not in self._known:
            env = environ(pid)
            if env is None:
                return None  # gone before we could read it: not cached
            if env.get(b"ORCH_RUN_ID") != self._run or env.get(b"ORCH_HOME") != self._home \
                    or b"ORCH_SHARD_ID" not in env:
                self._known[key] = None
            else:
                self._known[key] = (env[b"ORCH_SHARD_ID"].decode(errors="replace"),
                                    int(env.get(b"ORCH_ATTEMPT", b"0")))
            if len(self._known) > 200_000:
                self._known.clear()
        return self._known[key]

    def scan(self) -> list[tuple[int, int, int, str, int]]:
        """[(pid, pgid, starttime, shard, attempt)] of live (not zombie) processes, in the
        order read."""
        out = []
        for pid in _pids():
            st = proc_stat(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            ident = self._identity(pid, st[3])
            if ident is not None:
                out.append((pid, st[2], st[3], ident[0], ident[1]))
        return out


class Sampler:
    """Samples /proc in a thread for the run's live processes, and records every instant
    at which one shard had processes of two different attempts alive (promise 1).

    An attempt is identified by (ORCH_ATTEMPT, process group): two attempts that share
    a number but not a group (an attempt started by a master that died before recording
    it, then started again) are told apart too. A violation is only recorded when it is
    proven: a process read earlier in the scan is, after the scan, still the same live
    process, while a process of another attempt of the same shard was read alive after
    it. A SIGSTOPped or dying process counts as alive until it is gone (a zombie is gone).
    """

    def __init__(self, run_id: str, home: Path, interval_s: float = 0.03) -> None:
        self._table = ProcTable(run_id, home)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples = 0
        self.max_live: dict[str, int] = {}
        self.violations: list[tuple[str, list[tuple[int, int, int]]]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)

    @staticmethod
    def _still(pid: int, starttime: int, pgid: int) -> bool:
        st = proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X") and st[3] == starttime and st[2] == pgid

    def check(self, procs: list[tuple[int, int, int, str, int]]) -> None:
        by_shard: dict[str, list[tuple[int, int, int, int]]] = {}
        for pid, pgid, start, shard, attempt in procs:
            by_shard.setdefault(shard, []).append((attempt, pgid, pid, start))
        for shard, entries in by_shard.items():
            keys = {(a, g) for a, g, _, _ in entries}
            self.max_live[shard] = max(self.max_live.get(shard, 0), len(keys))
            if len(keys) < 2:
                continue
            for i, (a, g, pid, start) in enumerate(entries):
                later_other = any((a2, g2) != (a, g) for a2, g2, _, _ in entries[i + 1 :])
                if later_other and self._still(pid, start, g):
                    self.violations.append((shard, [(x, y, p) for x, y, p, _ in entries]))
                    break

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.check(self._table.scan())
                self.samples += 1
                self._stop.wait(self._interval_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def attempt_pids(run_id: str, home: Path) -> list[tuple[int, int, int, str, int]]:
    """Live processes of a run's attempts: (pid, pgid, starttime, shard id, attempt)."""
    return ProcTable(run_id, home).scan()


# --- the worker both chaos tests run ---------------------------------------------------------

#: A Python SDK shard that processes items ``start..n-1`` of its shard (``start`` from its
#: checkpoint). Per item it logs the processing (appended: "at least once" is visible), has
#: the item's result written to a temporary file and renames it into place (atomic: a redone
#: item overwrites, never duplicates), and only then checkpoints ``{"next": i + 1}``. An
#: interrupted attempt can therefore redo at most its last item.
#:
#: With ``child`` the work is done by grandchildren: one ``sh`` helper per attempt reads item
#: numbers on its stdin and runs ``sleep`` for each before writing the result; a helper that
#: dies makes the shard exit 1, a helper (or its ``sleep``) that is stopped freezes the work
#: while the shard's heartbeat goes on. With ``graceful`` as its fifth argument, SIGTERM
#: lets the shard finish the item at hand before it exits 143.
WORKER = """\
import os, subprocess, sys, time
from pathlib import Path
import shards

HELPER = '''
while read -r i; do
    sleep "$1" || exit 1
    printf '%s:%s\\n' "$2" "$i" > "$3/item-$i.tmp.$$" || exit 1
    echo "$3/item-$i.tmp.$$"
done
'''
shard = os.environ["ORCH_SHARD_ID"]
out = Path(sys.argv[1]) / shard
n, delay, via_child = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "child"
stopping = []
if sys.argv[5:] == ["graceful"]:
    # A graceful shard: SIGTERM lets it finish the item at hand, then it exits 143.
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
out.mkdir(parents=True, exist_ok=True)
cp = shards.last_checkpoint()
start = cp["next"] if cp else 0
shards.progress(start, n)
with open(out / "attempts.log", "a") as f:
    f.write(f"{os.environ['ORCH_ATTEMPT']} {os.getpid()} {start}\\n")
helper = None
if via_child and start < n:
    helper = subprocess.Popen(["sh", "-c", HELPER, "sh", str(delay), shard, str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
for i in range(start, n):
    if stopping:
        sys.exit(143)
    with open(out / "processed.log", "a") as f:
        f.write(f"{i}\\n")
    final = out / f"item-{i}.txt"
    if helper is not None:
        helper.stdin.write(f"{i}\\n")
        helper.stdin.flush()
        tmp = helper.stdout.readline().strip()
        if not tmp:
            sys.exit(f"the helper died ({helper.poll()})")
    else:
        time.sleep(delay)  # allowed-sleep: the shard's simulated work per item
        tmp = out / f"item-{i}.{os.getpid()}.tmp"
        tmp.write_text(f"{shard}:{i}\\n")
    os.replace(tmp, final)
    shards.progress(i + 1)
    shards.checkpoint({"next": i + 1})
if helper is not None:
    helper.stdin.close()
    helper.wait()
"""


def check_exactly_once(out_root: Path, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Every item's result exists once and is right; each item was processed at least once
    and at most once more per interrupted attempt. Returns shard -> (redone, attempts)."""
    found: dict[str, tuple[int, int]] = {}
    for shard, n in sizes.items():
        out = out_root / shard
        names = sorted(p.name for p in out.glob("item-*.txt"))
        assert names == sorted(f"item-{i}.txt" for i in range(n)), (shard, names)
        for i in range(n):
            assert (out / f"item-{i}.txt").read_text() == f"{shard}:{i}\n", (shard, i)
        processed = [int(x) for x in (out / "processed.log").read_text().split()]
        assert set(processed) == set(range(n)), (shard, sorted(set(range(n)) - set(processed)))
        attempts = (out / "attempts.log").read_text().splitlines()
        redone = len(processed) - n
        # Each attempt but the last may redo one item: the one it was on when it was stopped.
        assert 0 <= redone <= len(attempts) - 1, (shard, redone, attempts)
        found[shard] = (redone, len(attempts))
    return found


def count_lines(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                total += chunk.count(b"\n")
    return total
