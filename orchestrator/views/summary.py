"""The end-of-run summary the foreground ``orch run`` prints: counts, and why shards failed."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from orchestrator.runs import RunDir
from orchestrator.store import Store
from orchestrator.units import format_duration
from orchestrator.views.figures import counts_text


def print_summary(store: Store, run_dir: RunDir, out: Any = None, limit: int = 20) -> None:
    """The end-of-run summary: counts, duration, and each failed shard with its reason.

    Reads only the failed shards, so a 100,000-shard run summarises in little memory.
    """
    # Imported here: ``orch run`` loads this module at start but needs it only at the end.
    from orchestrator.views.report import run_summary, shard_record

    out = out or sys.stdout
    summary = run_summary(store, run_dir)
    run = store.run()
    end = run.get("ended_at") or time.time()
    counts = counts_text(summary["counts"])
    took = format_duration(max(0.0, end - run["started_at"]))
    out.write(f"orch: run {summary['id']} {summary['state']} in {took}: {counts}\n")
    failed = store.shards(states=["failed"])
    for row in failed[:limit]:
        rec = shard_record(row, run_dir, time.time(), live=False)
        out.write(f"  {rec['id']}: {rec['reason']}\n")
        for ln in (rec["last_error"] or "").splitlines()[-5:]:
            out.write(f"    | {ln}\n")
        if os.path.exists(rec["log_stderr"]):  # an attempt that never started wrote no log
            out.write(f"    log: {rec['log_stderr']}\n")
    if len(failed) > limit:
        out.write(
            f"  ... and {len(failed) - limit} more failed shards ('orch status {summary['id']}')\n"
        )
    out.flush()
