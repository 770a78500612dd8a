"""What ``orch status`` says: run and shard records built from the state database.

The JSON schema produced here is a contract (docs/cli.md, "orch status
--json"); fields are only ever added. Times are ISO 8601 in UTC; durations are seconds with
an ``_s`` suffix; sizes are bytes with a ``_bytes`` suffix.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from orchestrator import procfs
from orchestrator.logs import log_stem
from orchestrator.runs import LOGS, STATE_DB
from orchestrator.store import Store

SCHEMA_VERSION = 1


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def master_alive(run: dict[str, Any]) -> bool:
    """Whether the master recorded in ``run`` still lives (pid plus its start time).

    A zombie is dead: a killed detached master whose parent (init in a
    container whose PID 1 does not reap) never collects it must still show
    as lost and be resumable.
    """
    pid = run.get("master_pid")
    if not pid:
        return False
    fields = procfs.stat_fields(pid)
    if not fields or fields[0] in (b"Z", b"X"):
        return False
    recorded = run.get("master_create_time")
    if recorded is None:
        return True
    return float(fields[19]) == float(recorded)


def run_state(run: dict[str, Any]) -> str:
    """The stored state, or ``lost`` when it says running but its master is gone."""
    state = str(run.get("state") or "running")
    if state == "running" and not master_alive(run):
        return "lost"
    return state


def _rate(
    done: int | None, start: float | None, last: float | None, base: int | None
) -> float | None:
    if done is None or start is None or last is None or last <= start:
        return None
    moved = done - (base or 0)
    return max(0.0, moved / (last - start))


#: Shard states that need a live master; in a lost run they are shown as ``lost``.
_UNFINISHED = frozenset({"running", "stopping", "backoff"})


def shard_record(
    row: dict[str, Any], run_dir: str, now: float, live: bool, lost: bool = False
) -> dict[str, Any]:
    """One shard as ``orch status`` shows it. In a ``lost`` run a shard the dead master
    was running (or stopping, or about to restart) is ``lost``: no pid, rate or ETA,
    since nothing runs it until ``orch resume``."""
    if lost and row.get("state") in _UNFINISHED:
        row = {**row, "state": "lost", "pid": None, "heartbeat_at": None}
    done, total = row.get("done"), row.get("total")
    rate = None
    if row.get("state") == "running":
        rate = _rate(done, row.get("started_at"), row.get("heartbeat_at"), row.get("start_done"))
    eta = None
    if rate and total is not None and done is not None and rate > 0:
        eta = max(0.0, (total - done) / rate)
    hb = row.get("heartbeat_at")
    cpu, rss = None, None
    pid = row.get("pid")
    if live and pid and row.get("state") in ("running", "stopping"):
        cpu, rss = procfs.cpu_and_rss(pid)
    stem = os.path.join(run_dir, LOGS, log_stem(row["idx"], row["id"]))
    return {
        "id": row["id"],
        "index": row["idx"],
        "state": row["state"],
        "attempts": row.get("attempts") or 0,
        "pid": pid,
        "exit_code": row.get("exit_code"),
        "signal": row.get("signal"),
        "reason": row.get("reason"),
        "last_error": row.get("last_error"),
        "done": done,
        "total": total,
        "rate": rate,
        "eta_s": eta,
        "checkpoint": row.get("checkpoint"),
        "message": row.get("message"),
        "heartbeat_age_s": (now - hb) if hb is not None and row.get("state") == "running" else None,
        "cpu_percent": cpu,
        "rss_bytes": rss,
        "started_at": iso(row.get("started_at")),
        "ended_at": iso(row.get("ended_at")),
        "log_stdout": stem + ".out",
        "log_stderr": stem + ".err",
    }


def run_summary(store: Store, run_dir: str) -> dict[str, Any]:
    """The short form used by ``orch status`` (no RUN)."""
    run = store.run()
    counts = store.counts()
    state = run_state(run)
    if state == "lost":
        counts = _lost_counts(counts)
    done, total = store.progress_totals()
    return {
        "id": run["id"],
        "name": run.get("name"),
        "state": state,
        "exit_code": run.get("exit_code"),
        "started_at": iso(run.get("started_at")),
        "ended_at": iso(run.get("ended_at")),
        "shard_count": run.get("shard_count"),
        "counts": counts,
        "items_done": done,
        "items_total": total,
        "run_dir": run_dir,
    }


def _lost_counts(counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for state, n in counts.items():
        key = "lost" if state in _UNFINISHED else state
        out[key] = out.get(key, 0) + n
    return out


def run_detail(store: Store, run_dir: str, *, sample: bool = True) -> dict[str, Any]:
    """The full form used by ``orch status RUN``."""
    now = time.time()
    out = run_summary(store, run_dir)
    live = out["state"] == "running"
    run = store.run()
    lost = out["state"] == "lost"
    shards = [shard_record(r, run_dir, now, live and sample, lost) for r in store.shards()]
    rates = [s["rate"] for s in shards if s["rate"] is not None]
    rate = sum(rates) if rates else None
    items_done, items_total = out["items_done"], out["items_total"]
    eta = None
    if rate and items_total is not None:
        eta = max(0.0, (items_total - items_done) / rate)
    end = run.get("ended_at") or now
    out.update(
        {
            "schema": SCHEMA_VERSION,
            "duration_s": max(0.0, end - run["started_at"]),
            "jobs": run.get("jobs"),
            "source": run.get("source"),
            "task": run.get("task_json"),
            "master_pid": run.get("master_pid") if live else None,
            "rate": rate,
            "eta_s": eta,
            "counters": store.counters(),
            "shards": shards,
        }
    )
    return out


def open_run(run_dir: str) -> Store:
    return Store.open(os.path.join(run_dir, STATE_DB), readonly=True)
