"""Prometheus ``/metrics``, built at scrape time from the run stores.

Every family except ``orch_run_info`` is labelled by ``job`` (the task name,
else the run name, else the run id), never by run id, so the number of
series stays bounded however many runs come and go. A job's figures come
from its live runs (summed; several live runs of one task are possible), or,
when none is live, from its newest run that ended (or was lost) within
``recent_s``.

Per-shard series (``orch_shard_*{job, shard}``) are written only for runs of
at most ``shard_series_max`` shards; a larger run gets
``orch_metrics_shards_omitted{job}`` (its shard count) instead.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.serve import data
from orchestrator.serve.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (name, type, help) of every family, in the order they are written.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("orch_run_info", "gauge", "A live or recently ended run (always 1)."),
    ("orch_shards", "gauge", "Shards of the job's runs in each state."),
    ("orch_items_done_total", "counter", "Items done, as reported by the shards."),
    ("orch_items_expected", "gauge", "Items expected in all (absent while unknown)."),
    ("orch_shard_restarts_total", "counter", "Attempts followed by another, by the reason."),
    ("orch_shard_failures_total", "counter", "Attempts that ended in a failure."),
    ("orch_run_start_timestamp_seconds", "gauge", "When the job's run started (Unix time)."),
    (
        "orch_run_estimated_completion_timestamp_seconds",
        "gauge",
        "When the run should be done at its current rate (absent while unknown).",
    ),
    (
        "orch_heartbeat_oldest_timestamp_seconds",
        "gauge",
        "The oldest last heartbeat among running shards (Unix time).",
    ),
    (
        "orch_progress_oldest_timestamp_seconds",
        "gauge",
        "The oldest last progress among running shards (Unix time).",
    ),
    ("orch_concurrency_jobs", "gauge", "How many shards may run at once."),
    ("orch_metrics_shards_omitted", "gauge", "Shards of a run too large for per-shard series."),
    ("orch_shard_items_done", "gauge", "Items done by one shard (small runs only)."),
    ("orch_shard_items_expected", "gauge", "Items expected of one shard (small runs only)."),
    ("orch_shard_attempts", "gauge", "Attempts started for one shard (small runs only)."),
    ("orch_shard_running", "gauge", "1 while the shard runs (small runs only)."),
    (
        "orch_shard_heartbeat_timestamp_seconds",
        "gauge",
        "One shard's last heartbeat (small runs only).",
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


@dataclass
class _Job:
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(data.STATES, 0))
    done: int = 0
    expected: int | None = 0
    restarts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: int = 0
    start: float | None = None
    completion: float | None = None
    heartbeat_oldest: float | None = None
    progress_oldest: float | None = None
    concurrency: int = 0
    omitted: int = 0
    shards: list[tuple[str, Any]] = field(default_factory=list)


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _reason_class(reason: str) -> str:
    """A bounded label for a restart reason: 'exit 3' -> 'exit', 'killed by SIGKILL' -> 'signal'."""
    r = reason.lower()
    for key, label in (
        ("heartbeat", "heartbeat"),
        ("stall", "stalled"),
        ("progress", "stalled"),
        ("memory", "memory"),
        ("restarted by user", "user"),
        ("cannot start", "spawn"),
        ("signal", "signal"),
        ("killed", "signal"),
        ("sig", "signal"),
        ("exit", "exit"),
    ):
        if key in r:
            return label
    return "other"


def _chosen(hub: Hub, now: float, recent_s: float) -> dict[str, list[data.RunFacts]]:
    by_job: dict[str, list[data.RunFacts]] = defaultdict(list)
    for f in hub.facts():
        by_job[f.job].append(f)
    out: dict[str, list[data.RunFacts]] = {}
    for job, runs in by_job.items():
        live = [f for f in runs if f.state == "running"]
        if live:
            out[job] = live
            continue
        recent = [f for f in runs if now - _last_change(f) <= recent_s]
        if recent:
            out[job] = [max(recent, key=lambda f: f.started_at)]
    return out


def _last_change(f: data.RunFacts) -> float:
    if f.ended_at is not None:
        return float(f.ended_at)
    try:
        return max(os.stat(p).st_mtime for p in data.db_files(f.run_dir) if os.path.exists(p))
    except (OSError, ValueError):
        return f.started_at


def render(hub: Hub, *, shard_series_max: int = 100, recent_s: float = 3600.0) -> str:
    now = time.time()
    chosen = _chosen(hub, now, recent_s)
    info: list[tuple[dict[str, str], float]] = []
    jobs: dict[str, _Job] = {}
    for job, runs in sorted(chosen.items()):
        j = jobs[job] = _Job()
        for f in runs:
            try:
                agg = data.aggregates(f.run_dir)
            except data.OrchError:
                continue
            info.append(({"run": f.id, "job": job, "state": f.state}, 1))
            for state, n in agg["counts"].items():
                j.states[state] = j.states.get(state, 0) + n
            j.done += agg["items_done"]
            if j.expected is not None:
                j.expected = None if agg["items_total"] is None else j.expected + agg["items_total"]
            for reason, n in agg["restarts"].items():
                j.restarts[_reason_class(reason)] += n
            j.failures += agg["failures"]
            j.start = _min(j.start, f.started_at)
            j.concurrency += f.jobs or 0
            if f.state == "running":
                j.heartbeat_oldest = _min(j.heartbeat_oldest, agg["heartbeat_oldest"])
                j.progress_oldest = _min(j.progress_oldest, hub.progress_oldest(f.run_dir))
                stats = hub.stats(f.id)
                eta = stats.get("eta_s") if stats else None
                if eta is not None:
                    done_at = now + float(eta)
                    j.completion = done_at if j.completion is None else max(j.completion, done_at)
            elif f.ended_at is not None:
                j.completion = float(f.ended_at)
            if f.shard_count <= shard_series_max:
                j.shards.extend((job, row) for row in data.shard_metrics(f.run_dir))
            else:
                j.omitted += f.shard_count
    return _write(info, jobs)


def _write(info: list[tuple[dict[str, str], float]], jobs: dict[str, _Job]) -> str:
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    series["orch_run_info"] = info
    for job, j in jobs.items():
        lab = {"job": job}
        for state, n in j.states.items():
            series["orch_shards"].append(({"job": job, "state": state}, n))
        series["orch_items_done_total"].append((lab, j.done))
        if j.expected is not None:
            series["orch_items_expected"].append((lab, j.expected))
        for reason, n in sorted(j.restarts.items()):
            series["orch_shard_restarts_total"].append(({"job": job, "reason": reason}, n))
        series["orch_shard_failures_total"].append((lab, j.failures))
        if j.start is not None:
            series["orch_run_start_timestamp_seconds"].append((lab, j.start))
        if j.completion is not None:
            series["orch_run_estimated_completion_timestamp_seconds"].append((lab, j.completion))
        if j.heartbeat_oldest is not None:
            series["orch_heartbeat_oldest_timestamp_seconds"].append((lab, j.heartbeat_oldest))
        if j.progress_oldest is not None:
            series["orch_progress_oldest_timestamp_seconds"].append((lab, j.progress_oldest))
        series["orch_concurrency_jobs"].append((lab, j.concurrency))
        if j.omitted:
            series["orch_metrics_shards_omitted"].append((lab, j.omitted))
        for _, row in j.shards:
            sl = {"job": job, "shard": str(row["id"])}
            series["orch_shard_items_done"].append((sl, row["done"] or 0))
            if row["total"] is not None:
                series["orch_shard_items_expected"].append((sl, row["total"]))
            series["orch_shard_attempts"].append((sl, row["attempts"] or 0))
            series["orch_shard_running"].append((sl, 1 if row["state"] == "running" else 0))
            if row["heartbeat_at"] is not None:
                series["orch_shard_heartbeat_timestamp_seconds"].append((sl, row["heartbeat_at"]))
    return "".join(_family(name, kind, text, series.get(name, ())) for name, kind, text in FAMILIES)


def _family(name: str, kind: str, text: str, rows: Iterable[tuple[dict[str, str], float]]) -> str:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_num(value)}" for labels, value in rows]
    return "\n".join(lines) + "\n"
