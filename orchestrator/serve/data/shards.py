"""One shard of a run as serve shows it: its status record, its attempts, the shards
that need a look, and slices of its logs."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import orjson

from orchestrator.runs import RunDir
from orchestrator.serve.data.runs import NotFound, query
from orchestrator.views import report


def _shard_row(run_dir: RunDir, key: str) -> sqlite3.Row:
    rows = query(run_dir, "SELECT * FROM shards WHERE id = ?", (key,))
    if not rows and key.isdigit():
        rows = query(run_dir, "SELECT * FROM shards WHERE idx = ?", (int(key),))
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
    rows = query(
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
    rows = query(
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
