"""What ``orch status`` says: run and shard records built from the state database.

The JSON schema produced here is a contract (docs/cli.md, "orch status
--json"); fields are only ever added. Times are ISO 8601 in UTC; durations are seconds with
an ``_s`` suffix; sizes are bytes with a ``_bytes`` suffix.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from orchestrator import procfs
from orchestrator.runs import RunDir, run_state
from orchestrator.store import Store
from orchestrator.views.figures import UNFINISHED, eta_s, lost_counts, rate_between, total_rate

SCHEMA_VERSION = 1


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def shard_record(
    row: dict[str, Any], run_dir: RunDir, now: float, live: bool, lost: bool = False
) -> dict[str, Any]:
    """One shard as ``orch status`` shows it. In a ``lost`` run a shard the dead master
    was running (or stopping, or about to restart) is ``lost``: no pid, rate or ETA,
    since nothing runs it until ``orch resume``."""
    if lost and row.get("state") in UNFINISHED:
        row = {**row, "state": "lost", "pid": None, "heartbeat_at": None}
    done, total = row.get("done"), row.get("total")
    rate = None
    if row.get("state") == "running":
        rate = rate_between(
            done, row.get("started_at"), row.get("heartbeat_at"), row.get("start_done")
        )
    hb = row.get("heartbeat_at")
    cpu, rss = None, None
    pid = row.get("pid")
    if live and pid and row.get("state") in ("running", "stopping"):
        cpu, rss = procfs.cpu_and_rss(pid)
    return {
        "id": row["id"],
        "index": row["idx"],
        "state": row["state"],
        "attempts": row.get("attempts") or 0,
        "pid": pid,
        "node": row.get("node"),
        "exit_code": row.get("exit_code"),
        "signal": row.get("signal"),
        "reason": row.get("reason"),
        "last_error": row.get("last_error"),
        "done": done,
        "total": total,
        "rate": rate,
        "eta_s": eta_s(done, total, rate),
        "checkpoint": row.get("checkpoint"),
        "message": row.get("message"),
        "heartbeat_age_s": (now - hb) if hb is not None and row.get("state") == "running" else None,
        "cpu_percent": cpu,
        "rss_bytes": rss,
        "started_at": iso(row.get("started_at")),
        "ended_at": iso(row.get("ended_at")),
        "log_stdout": run_dir.log_path(row["idx"], row["id"], ".out"),
        "log_stderr": run_dir.log_path(row["idx"], row["id"], ".err"),
    }


def run_summary(store: Store, run_dir: RunDir) -> dict[str, Any]:
    """The short form used by ``orch status`` (no RUN)."""
    run = store.run()
    counts = store.counts()
    state = run_state(run)
    if state == "lost":
        counts = lost_counts(counts)
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
        "run_dir": run_dir.path,
    }


def run_detail(store: Store, run_dir: RunDir, *, sample: bool = True) -> dict[str, Any]:
    """The full form used by ``orch status RUN``."""
    now = time.time()
    out = run_summary(store, run_dir)
    live = out["state"] == "running"
    run = store.run()
    lost = out["state"] == "lost"
    shards = [shard_record(r, run_dir, now, live and sample, lost) for r in store.shards()]
    rate = total_rate(s["rate"] for s in shards)
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
            "eta_s": eta_s(out["items_done"], out["items_total"], rate),
            "counters": store.counters(),
            "shards": shards,
        }
    )
    return out
