"""Runs as serve sees them: listing and resolving run directories, the status records
(the same objects as ``orch status --json``), the live facts of a run, aggregates and
pages of shards read straight from its store (read-only)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from orchestrator import __version__, procfs, runs
from orchestrator.configfile import CONFIG_NAME
from orchestrator.errors import RET_OK, OrchError, RunNotFound, UsageError
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


def connect(run_dir: RunDir) -> sqlite3.Connection:
    path = run_dir.state_db
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    except sqlite3.Error as exc:
        raise OrchError(f"{path}: cannot open: {exc}") from None
    conn.row_factory = sqlite3.Row
    return conn


def query(run_dir: RunDir, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = connect(run_dir)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise OrchError(f"{run_dir.path}: cannot read: {exc}") from None
    finally:
        conn.close()


def aggregates(run_dir: RunDir) -> dict[str, Any]:
    """Counts, items and timestamps of one run for /metrics and the live progress feed."""
    conn = connect(run_dir)
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
    conn = connect(run_dir)
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
    rows = query(run_dir, "SELECT idx, done, started_at FROM shards WHERE state = 'running'")
    return [(r[0], r[1], r[2]) for r in rows]


def shard_states(run_dir: RunDir) -> list[str]:
    """The state of every shard, by index: the dashboard's grid (10,000 cells)."""
    return [r[0] for r in query(run_dir, "SELECT state FROM shards ORDER BY idx")]


def shard_metrics(run_dir: RunDir) -> list[sqlite3.Row]:
    """Per-shard figures for /metrics on small runs."""
    return query(
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
    conn = connect(run_dir)
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
