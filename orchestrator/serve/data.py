"""The one place ``orch serve`` touches orch's internals.

Everything the web server knows about runs comes through the small functions
here: listing and resolving runs, the status records (the same objects as
``orch status --json``), shard pages, attempts, log slices, the control
client, the event feed, and starting or resuming a run. The rest of
``orchestrator/serve`` imports only this module, so a change inside the core
is absorbed here.

Everything is read-only: stores are opened with ``mode=ro`` (WAL readers
never block the master), and starting or resuming a run goes through the same
``python -m orchestrator`` entry point a user would type, detached.

Environment values never leave this module: every object built here has its
task's ``env`` values replaced by ``REDACTED``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from orchestrator import __version__, control, procfs, runs
from orchestrator.configfile import CONFIG_NAME, load_config
from orchestrator.errors import RET_OK, MasterUnreachable, OrchError, RunNotFound, UsageError
from orchestrator.runs import RunDir
from orchestrator.views import report
from orchestrator.views.figures import eta_s, rate_between

#: Re-exported for the rest of serve, which imports nothing else of orch.
VERSION = __version__
EXIT_OK = RET_OK
DEFAULT_CONFIG = CONFIG_NAME
BadUsage = UsageError
#: A run's directory and every path in it; rate and ETA as every view computes them.
__all__ = ["RunDir", "eta_s", "rate_between"]

REDACTED = "<redacted>"
#: Every shard state, in the order the dashboard shows them.
STATES = ("pending", "running", "stopping", "backoff", "done", "failed", "stopped")
#: States of a shard that has not finished.
UNFINISHED = ("pending", "running", "stopping", "backoff")


class NotFound(OrchError):
    """Raised when a run, shard or task asked for does not exist."""


def home_dir(explicit: str | None) -> str:
    return runs.home_dir(explicit)


def runs_root(home: str) -> str:
    """The directory holding every run of ``home`` (its mtime moves when a run appears)."""
    return runs.runs_root(home)


def run_dirs(home: str) -> list[RunDir]:
    """Run directories under ``home``, newest first."""
    return runs.list_runs(home)


def resolve(home: str, key: str) -> RunDir:
    """The run directory for a run id, unique id prefix or name (like the CLI)."""
    if not key or "/" in key or key in (".", ".."):
        raise NotFound(f"no run {key!r}")
    try:
        return runs.find_run(key, home)
    except RunNotFound as exc:
        raise NotFound(str(exc)) from None


def db_files(run_dir: RunDir) -> tuple[str, str]:
    """The run's database and its write-ahead log: what changes when the master writes."""
    return run_dir.state_db, run_dir.state_db + "-wal"


def _redact(obj: dict[str, Any]) -> dict[str, Any]:
    task = obj.get("task")
    if isinstance(task, dict) and isinstance(task.get("env"), dict):
        obj["task"] = {**task, "env": {k: REDACTED for k in task["env"]}}
    return obj


def list_runs(home: str) -> list[dict[str, Any]]:
    """The same list as ``orch status --json``: every run, newest first."""
    out = []
    for d in run_dirs(home):
        try:
            store = d.read()
        except OrchError:
            continue
        try:
            out.append(report.run_summary(store, d))
        except OrchError:
            continue
        finally:
            store.close()
    return out


def run_detail(run_dir: RunDir, *, shards: bool = True) -> dict[str, Any]:
    """The same object as ``orch status RUN --json`` (env values redacted).

    ``shards=False`` leaves the (possibly 10,000-long) shard list out. A live
    run's CPU and memory per process come from ``Sampler`` (each process read
    at most once a second), so a dashboard polling a 1,000-shard run does not
    read 1,000 /proc files per request.
    """
    store = run_dir.read()
    try:
        if shards:
            out = report.run_detail(store, run_dir, sample=False)
            if out["state"] == "running":
                SAMPLER.fill(out["shards"])
            return _redact(out)
        out = report.run_summary(store, run_dir)
        run = store.run()
        out["jobs"] = run.get("jobs")
        out["task"] = run.get("task_json")
        out["master_pid"] = run.get("master_pid") if out["state"] == "running" else None
        return _redact(out)
    finally:
        store.close()


class Sampler:
    """CPU percent (over the process's life) and RSS per pid, kept for ``ttl_s``.

    The same figures as ``orch status`` (``procfs.cpu_and_rss``), read with one
    ``/proc/uptime`` per call instead of one per process.
    """

    def __init__(self, ttl_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[int, tuple[float, float | None, int | None]] = {}

    def fill(self, records: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        up: float | None = None
        if len(self._cache) > 100_000:
            self._cache.clear()
        for rec in records:
            pid = rec.get("pid")
            if not pid or rec.get("state") not in ("running", "stopping"):
                continue
            hit = self._cache.get(pid)
            if hit is None or now - hit[0] > self.ttl_s:
                if up is None:
                    up = procfs.uptime()
                cpu, rss = procfs.cpu_and_rss(pid, up)
                hit = self._cache[pid] = (now, cpu, rss)
            rec["cpu_percent"], rec["rss_bytes"] = hit[1], hit[2]


SAMPLER = Sampler()


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the event hub and /metrics need about a run, read in one go."""

    id: str
    name: str
    job: str
    state: str
    run_dir: RunDir
    control: str | None
    shard_count: int
    jobs: int | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    master_pid: int | None = None
    master_create_time: float | None = None


def master_alive(facts: RunFacts) -> bool:
    """Whether the run's recorded master still lives: a /proc read, no database."""
    return runs.master_alive(
        {"master_pid": facts.master_pid, "master_create_time": facts.master_create_time}
    )


def _job(run: dict[str, Any]) -> str:
    """The ``job`` label: the task name, else the run name, else the run id.

    ``run`` is what an ad-hoc command (no task of orch.toml) is called, so it
    does not count as a task name.
    """
    task = run.get("task_json") or {}
    task_name = task.get("name") if isinstance(task, dict) else None
    if task_name and task_name != "run":
        return str(task_name)
    if run.get("name") and run.get("name") != "run":
        return str(run["name"])
    return str(run["id"])


def run_facts(run_dir: RunDir) -> RunFacts | None:
    """The run row's facts with its state (``lost`` when its master is gone); None if unreadable."""
    try:
        store = run_dir.read()
    except OrchError:
        return None
    try:
        run = store.run()
    except OrchError:
        return None
    finally:
        store.close()
    return RunFacts(
        id=run["id"],
        name=run.get("name") or "",
        job=_job(run),
        state=runs.run_state(run),
        run_dir=run_dir,
        control=run.get("control"),
        shard_count=int(run.get("shard_count") or 0),
        jobs=run.get("jobs"),
        started_at=float(run["started_at"]),
        ended_at=run.get("ended_at"),
        exit_code=run.get("exit_code"),
        master_pid=run.get("master_pid"),
        master_create_time=run.get("master_create_time"),
    )


# --- direct read-only queries (aggregates and pages the Store has no method for) ----


def _connect(run_dir: RunDir) -> sqlite3.Connection:
    path = run_dir.state_db
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    except sqlite3.Error as exc:
        raise OrchError(f"{path}: cannot open: {exc}") from None
    conn.row_factory = sqlite3.Row
    return conn


def _query(run_dir: RunDir, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = _connect(run_dir)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise OrchError(f"{run_dir.path}: cannot read: {exc}") from None
    finally:
        conn.close()


def aggregates(run_dir: RunDir) -> dict[str, Any]:
    """Counts, items and timestamps of one run for /metrics and the live progress feed."""
    conn = _connect(run_dir)
    try:
        counts = dict(conn.execute("SELECT state, count(*) FROM shards GROUP BY state").fetchall())
        done, total, unknown, hb_oldest = conn.execute(
            "SELECT coalesce(sum(done), 0), sum(total),"
            " coalesce(sum(state IN ('pending', 'running', 'stopping', 'backoff')"
            " AND total IS NULL), 0),"
            " min(CASE WHEN state = 'running' THEN coalesce(heartbeat_at, started_at) END)"
            " FROM shards"
        ).fetchone()
        restarts = dict(
            conn.execute(
                "SELECT coalesce(a.reason, 'unknown'), count(*) FROM attempts a"
                " JOIN attempts b ON b.shard_idx = a.shard_idx AND b.attempt = a.attempt + 1"
                " GROUP BY 1"
            ).fetchall()
        )
        (failures,) = conn.execute(
            "SELECT count(*) FROM attempts WHERE ended_at IS NOT NULL AND"
            " (reason IS NULL OR (reason != 'exit 0' AND reason NOT LIKE 'stopped%'"
            " AND reason != 'restarted by user'))"
        ).fetchone()
    except sqlite3.Error as exc:
        raise OrchError(f"{run_dir.path}: cannot read: {exc}") from None
    finally:
        conn.close()
    return {
        "counts": counts,
        "items_done": int(done),
        "items_total": None if unknown or total is None else int(total),
        "heartbeat_oldest": hb_oldest,
        "restarts": restarts,
        "failures": int(failures),
    }


def aggregates_light(run_dir: RunDir) -> dict[str, Any]:
    """Counts and items of one run: what the live progress feed reads once a second."""
    conn = _connect(run_dir)
    try:
        counts = dict(conn.execute("SELECT state, count(*) FROM shards GROUP BY state").fetchall())
        done, total, unknown, known, n = conn.execute(
            "SELECT coalesce(sum(done), 0), sum(total),"
            " coalesce(sum(state IN ('pending', 'running', 'stopping', 'backoff')"
            " AND total IS NULL), 0), count(total), count(*) FROM shards"
        ).fetchone()
    except sqlite3.Error as exc:
        raise OrchError(f"{run_dir.path}: cannot read: {exc}") from None
    finally:
        conn.close()
    items_total = None if unknown or total is None else int(total)
    estimate = items_total
    if estimate is None and known:
        # shards that have not reported yet are taken to be like those that have
        estimate = round(total + (n - known) * total / known)
    return {
        "counts": counts,
        "items_done": int(done),
        "items_total": items_total,
        "items_total_estimate": estimate,
    }


def running_progress(run_dir: RunDir) -> list[tuple[int, int | None, float | None]]:
    """(index, done, started_at) of each running shard: the hub tracks when ``done`` moves."""
    rows = _query(run_dir, "SELECT idx, done, started_at FROM shards WHERE state = 'running'")
    return [(r[0], r[1], r[2]) for r in rows]


def shard_states(run_dir: RunDir) -> list[str]:
    """The state of every shard, by index: the dashboard's grid (10,000 cells)."""
    return [r[0] for r in _query(run_dir, "SELECT state FROM shards ORDER BY idx")]


def shard_metrics(run_dir: RunDir) -> list[sqlite3.Row]:
    """Per-shard figures for /metrics on small runs."""
    return _query(
        run_dir, "SELECT id, state, attempts, done, total, heartbeat_at FROM shards ORDER BY idx"
    )


SORTS = {
    "index": "idx",
    "id": "id",
    "state": "state, idx",
    "attempts": "attempts, idx",
    "progress": "CAST(coalesce(done, 0) AS REAL) / max(coalesce(total, 0), 1), idx",
    "heartbeat": "coalesce(heartbeat_at, 0), idx",
    "memory": "coalesce(rss_bytes, 0), idx",
}


def shard_page(
    run_dir: RunDir, *, states: list[str], sort: str, desc: bool, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of shard records (``orch status`` objects) and how many match in all."""
    where = ""
    params: tuple[Any, ...] = ()
    if states:
        where = f" WHERE state IN ({', '.join('?' * len(states))})"
        params = tuple(states)
    order = SORTS[sort]
    if desc:
        order = ", ".join(f"{part} DESC" for part in order.split(", "))
    conn = _connect(run_dir)
    try:
        (total,) = conn.execute(f"SELECT count(*) FROM shards{where}", params).fetchone()
        rows = conn.execute(
            f"SELECT * FROM shards{where} ORDER BY {order} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        (run_state_raw, master_pid, create_time) = conn.execute(
            "SELECT state, master_pid, master_create_time FROM run"
        ).fetchone()
    except sqlite3.Error as exc:
        raise OrchError(f"{run_dir.path}: cannot read: {exc}") from None
    finally:
        conn.close()
    live = (
        runs.run_state(
            {"state": run_state_raw, "master_pid": master_pid, "master_create_time": create_time}
        )
        == "running"
    )
    now = time.time()
    out = []
    for r in rows:
        row = dict(r)
        row["checkpoint"] = orjson.loads(row["checkpoint"]) if row["checkpoint"] else None
        row.pop("record", None)
        out.append(report.shard_record(row, run_dir, now, False))
    if live:
        SAMPLER.fill(out)
    return out, int(total)


def _shard_row(run_dir: RunDir, key: str) -> sqlite3.Row:
    rows = _query(run_dir, "SELECT * FROM shards WHERE id = ?", (key,))
    if not rows and key.isdigit():
        rows = _query(run_dir, "SELECT * FROM shards WHERE idx = ?", (int(key),))
    if not rows:
        raise NotFound(f"no shard {key!r} in run {run_dir.id}")
    return rows[0]


def shard_id(run_dir: RunDir, key: str) -> str:
    """The shard's id for a shard id or index (like ``orch logs --shard``)."""
    return str(_shard_row(run_dir, key)["id"])


def shard_detail(run_dir: RunDir, key: str, live: bool) -> dict[str, Any]:
    """One shard's ``orch status`` record plus its attempts, oldest first."""
    row = dict(_shard_row(run_dir, key))
    row["checkpoint"] = orjson.loads(row["checkpoint"]) if row["checkpoint"] else None
    row.pop("record", None)
    rec = report.shard_record(row, run_dir, time.time(), live)
    rec["attempt_list"] = attempts(run_dir, row["idx"])
    return rec


def attempts(run_dir: RunDir, idx: int) -> list[dict[str, Any]]:
    rows = _query(
        run_dir,
        "SELECT attempt, pid, started_at, ended_at, exit_code, signal, reason FROM attempts"
        " WHERE shard_idx = ? ORDER BY attempt",
        (idx,),
    )
    return [
        {
            "attempt": r["attempt"],
            "pid": r["pid"],
            "started_at": report.iso(r["started_at"]),
            "ended_at": report.iso(r["ended_at"]),
            "exit_code": r["exit_code"],
            "signal": r["signal"],
            "reason": r["reason"],
        }
        for r in rows
    ]


def attention(run_dir: RunDir, limit: int, tail_bytes: int) -> list[dict[str, Any]]:
    """Shards that need a look: failed, backing off after a failure, hung or stalled."""
    rows = _query(
        run_dir,
        "SELECT idx, id, state, attempts, reason, last_error FROM shards"
        " WHERE state IN ('failed', 'backoff')"
        " OR (reason IS NOT NULL AND (reason LIKE '%heartbeat%' OR reason LIKE '%stall%'"
        " OR reason LIKE '%progress%') AND state NOT IN ('done', 'stopped'))"
        " ORDER BY state = 'failed' DESC, idx LIMIT ?",
        (limit,),
    )
    out = []
    for r in rows:
        path = log_path(run_dir, r["idx"], r["id"], "stderr")
        tail = read_log(path, None, tail_bytes)["data"]
        out.append(
            {
                "id": r["id"],
                "index": r["idx"],
                "state": r["state"],
                "attempts": r["attempts"],
                "reason": r["reason"],
                "stderr_tail": tail or (r["last_error"] or ""),
            }
        )
    return out


# --- logs ----------------------------------------------------------------------------


def log_path(run_dir: RunDir, idx: int, shard: str, stream: str) -> str:
    return run_dir.log_path(idx, shard, ".err" if stream == "stderr" else ".out")


def log_slice(
    run_dir: RunDir, key: str, stream: str, offset: int | None, limit: int
) -> dict[str, Any]:
    row = _shard_row(run_dir, key)
    return read_log(log_path(run_dir, row["idx"], row["id"], stream), offset, limit)


def read_log(path: str, offset: int | None, limit: int) -> dict[str, Any]:
    """``limit`` bytes of a log from ``offset`` (the tail without one), like supervisor's tail.

    An offset past the end (the log was rotated) starts again from the new file's top.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset is None:
                start = max(0, size - limit)
            elif offset > size:
                start = 0
            else:
                start = offset
            f.seek(start)
            data = f.read(limit)
    except FileNotFoundError:
        return {"data": "", "offset": offset or 0, "next_offset": offset or 0, "size": 0}
    if offset is None and start > 0:
        nl = data.find(b"\n")  # begin the tail at a line
        if 0 <= nl < len(data) - 1:
            data, start = data[nl + 1 :], start + nl + 1
    return {
        "data": data.decode("utf-8", "replace"),
        "offset": start,
        "next_offset": start + len(data),
        "size": size,
    }


# --- steering ------------------------------------------------------------------------


def send(control_endpoint: str, op: str, **fields: Any) -> dict[str, Any]:
    """One control request to a live master; MasterUnreachable when it does not answer."""
    return control.request(control_endpoint, op, **fields)


def follow_events(control_endpoint: str) -> Iterator[dict[str, Any]]:
    """The master's state changes until its run ends; MasterUnreachable when it dies."""
    reply = control.request(control_endpoint, "subscribe")
    if not reply.get("ok") or not isinstance(reply.get("events"), str):
        raise MasterUnreachable(f"the master at {control_endpoint} refused to subscribe")
    yield from control.follow_events(reply["events"], control_endpoint)


def _orch(
    args: list[str], home: str, timeout_s: float, cwd: str | None = None
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_HOME"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--home", home],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env=env,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].removeprefix("orch: ") if lines else ""


class StartFailed(OrchError):
    """Raised when ``orch run -d`` or ``orch resume -d`` refused or failed."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def start_task(config_path: str, name: str, home: str, timeout_s: float = 30.0) -> str:
    """``orch run NAME --config FILE -d``: the new run's id."""
    code, out, err = _orch(
        ["run", name, "--config", config_path, "-d"],
        home,
        timeout_s,
        cwd=os.path.dirname(config_path) or None,
    )
    if code != 0:
        raise StartFailed(_last_line(err) or f"orch run exited {code}", usage=code == 2)
    return _last_line(out)


def resume_run(run_id: str, home: str, timeout_s: float = 30.0) -> None:
    """``orch resume RUN -d``."""
    code, _, err = _orch(["resume", run_id, "-d"], home, timeout_s)
    if code != 0:
        raise StartFailed(_last_line(err) or f"orch resume exited {code}", usage=code == 2)


def task_list(config_path: str) -> list[dict[str, Any]]:
    """The tasks of orch.toml a front end may start (env values redacted)."""
    cfg = load_config(config_path)
    out = []
    for name, table in cfg.tasks.items():
        item: dict[str, Any] = {"name": name}
        for key in ("command", "call", "shards", "split", "range", "jobs", "restart"):
            if key in table:
                item[key] = table[key]
        if isinstance(table.get("env"), dict):
            item["env"] = {k: REDACTED for k in table["env"]}
        out.append(item)
    return out


def check_config(config_path: str) -> None:
    """A missing or broken orch.toml is a one-line error (``OrchError``) now, not at a POST."""
    load_config(config_path)


def task_names(config_path: str) -> list[str]:
    return list(load_config(config_path).tasks)
