"""``orch status``: the runs, newest first, or one run shard by shard, live or ended.

Works from any terminal: it reads the run's SQLite database (WAL, so a
reader never blocks the master); a live run's CPU and memory are sampled
from /proc.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from orchestrator.errors import RET_OK, OrchError
from orchestrator.runs import find_run, home_dir, list_runs
from orchestrator.units import format_bytes, format_duration
from orchestrator.views import table
from orchestrator.views.figures import counts_text, items_text
from orchestrator.views.report import run_detail, run_summary

LIST_LIMIT = 20


def _dump(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def status(run_key: str | None, *, as_json: bool, show_all: bool, home: str | None) -> int:
    if run_key is None:
        return _status_all(as_json=as_json, show_all=show_all, home=home)
    run_dir = find_run(run_key, home)
    store = run_dir.read()
    try:
        detail = run_detail(store, run_dir)
    finally:
        store.close()
    if as_json:
        _dump(detail)
    else:
        _print_detail(detail)
    return RET_OK


def _status_all(*, as_json: bool, show_all: bool, home: str | None) -> int:
    root = home_dir(home)
    dirs = list_runs(root)
    if not show_all and not as_json:
        dirs = dirs[:LIST_LIMIT]
    runs = []
    for d in dirs:
        try:
            store = d.read()
        except OrchError:
            continue
        try:
            runs.append(run_summary(store, d))
        finally:
            store.close()
    if as_json:
        _dump(runs)
        return RET_OK
    if not runs:
        print(f"no runs in {root}")
        return RET_OK
    rows = []
    for r in runs:
        shards = counts_text(r["counts"], sep=" ")
        items = items_text(r["items_done"], r["items_total"]) if r["items_done"] else ""
        started = (r["started_at"] or "")[:19].replace("T", " ")
        rows.append([r["id"], r["name"] or "-", r["state"], started, shards, items])
    table.render(("RUN", "NAME", "STATE", "STARTED", "SHARDS", "ITEMS"), rows, state_col=2)
    if any(r["state"] == "lost" for r in runs):
        print("lost: the master died while the run was live; 'orch resume RUN' finishes it")
    return RET_OK


def _why(s: dict[str, Any]) -> str:
    """The REASON column: why a shard ended or waits; for a live one, its last
    ``message`` and what ended its previous attempt (the last restart)."""
    if s["state"] == "done":
        return ""
    if s["state"] in ("running", "pending"):
        parts = [s["message"]] if s["message"] else []
        if s["attempts"] > 1 and s["reason"]:
            parts.append(f"last restart: {s['reason']}")
        return "; ".join(parts)
    return s["reason"] or ""


def _print_detail(d: dict[str, Any]) -> None:
    on = table.colour_enabled(sys.stdout)
    head = (
        f"run {d['id']} ({d['name'] or '-'}): {table.state(d['state'], on)}, "
        f"{d['shard_count']} shards, {format_duration(d['duration_s'])}"
    )
    if d["jobs"] is not None:
        head += f", jobs {d['jobs']}"
    if d["exit_code"] is not None:
        head += f", exit code {d['exit_code']}"
    line = counts_text(d["counts"])
    if d["items_done"]:
        line += f" | {items_text(d['items_done'], d['items_total'])} items"
        if d["rate"]:
            line += f", {d['rate']:,.1f}/s"
        if d["eta_s"] is not None:
            line += f", ETA {format_duration(d['eta_s'])}"
    print(head)
    print(line)
    if d["state"] == "lost":
        print(f"the master is gone: 'orch resume {d['id']}' finishes the run")
    rows = []
    # Runs on a cluster (--backend ray) show where each shard runs (the Ray node id, short).
    with_node = any(s.get("node") for s in d["shards"])
    for s in d["shards"]:
        prog = ""
        if s["done"] is not None:
            prog = items_text(s["done"], s["total"])
            if s["total"]:
                prog += f" {s['done'] / s['total']:.0%}"
        hb = format_duration(s["heartbeat_age_s"]) if s["heartbeat_age_s"] is not None else ""
        cpu = f"{s['cpu_percent']:.0f}%" if s["cpu_percent"] is not None else ""
        rss = format_bytes(s["rss_bytes"]) if s["rss_bytes"] is not None else ""
        reason = _why(s)
        rows.append(
            [
                s["id"],
                s["state"],
                str(s["attempts"]),
                str(s["pid"] or ""),
                prog,
                hb,
                cpu,
                rss,
                reason,
            ]
        )
        if with_node:
            rows[-1].insert(3, (s.get("node") or "")[:12])
    head_row = ["SHARD", "STATE", "ATT", "PID", "PROGRESS", "HEARTBEAT", "CPU", "RSS", "REASON"]
    if with_node:
        head_row.insert(3, "NODE")
    table.render(tuple(head_row), rows, state_col=1)
