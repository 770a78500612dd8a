"""``orch status`` and ``orch logs``: read-only views of runs, live or ended.

Both work from any terminal: they read the run's SQLite database (WAL, so a
reader never blocks the master) and its log files.
"""

from __future__ import annotations

import heapq
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from orchestrator import table
from orchestrator.errors import RET_OK, OrchError, RunNotFound
from orchestrator.logs import MARK, log_stem
from orchestrator.report import open_run, run_detail, run_state, run_summary, shard_record
from orchestrator.runs import LOGS, home_dir, list_run_dirs, resolve_run
from orchestrator.store import Store
from orchestrator.units import format_bytes, format_duration
from shards.protocol import STDOUT_PREFIX

LIST_LIMIT = 20


def _named(home: str, name: str) -> list[tuple[str, bool]]:
    """(run directory, live) of the runs called ``name``, newest first."""
    out: list[tuple[str, bool]] = []
    for d in list_run_dirs(home):
        try:
            store = open_run(d)
        except OrchError:
            continue
        try:
            run = store.run()
            if (run.get("name") or "") == name:
                out.append((d, run_state(run) == "running"))
        finally:
            store.close()
    return out


def find_run(key: str, home: str | None) -> str:
    """The run directory for a run id, a unique id prefix, or a name. Several runs with
    one name: the live one, else the newest."""
    root = home_dir(home)
    try:
        return resolve_run(root, key)
    except RunNotFound:
        named = _named(root, key)
        if not named:
            raise
    live = [d for d, is_live in named if is_live]
    return live[0] if live else named[0][0]


def _dump(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def status(run_key: str | None, *, as_json: bool, show_all: bool, home: str | None) -> int:
    if run_key is None:
        return _status_all(as_json=as_json, show_all=show_all, home=home)
    run_dir = find_run(run_key, home)
    store = open_run(run_dir)
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
    dirs = list_run_dirs(root)
    if not show_all and not as_json:
        dirs = dirs[:LIST_LIMIT]
    runs = []
    for d in dirs:
        try:
            store = open_run(d)
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
        counts = r["counts"]
        shards = " ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        items = ""
        if r["items_done"]:
            items = f"{r['items_done']:,}" + (f"/{r['items_total']:,}" if r["items_total"] else "")
        started = (r["started_at"] or "")[:19].replace("T", " ")
        rows.append([r["id"], r["name"] or "-", r["state"], started, shards, items])
    table.render(("RUN", "NAME", "STATE", "STARTED", "SHARDS", "ITEMS"), rows, state_col=2)
    if any(r["state"] == "lost" for r in runs):
        print("lost: the master died while the run was live; 'orch resume RUN' finishes it")
    return RET_OK


def _print_detail(d: dict[str, Any]) -> None:
    on = table.colour_enabled(sys.stdout)
    head = (
        f"run {d['id']} ({d['name'] or '-'}): {table.state(d['state'], on)}, "
        f"{d['shard_count']} shards, {format_duration(d['duration_s'])}"
    )
    if d["exit_code"] is not None:
        head += f", exit code {d['exit_code']}"
    line = ", ".join(f"{n} {s}" for s, n in sorted(d["counts"].items()))
    if d["items_done"]:
        line += f" | {d['items_done']:,}" + (f"/{d['items_total']:,}" if d["items_total"] else "")
        line += " items"
        if d["rate"]:
            line += f", {d['rate']:,.1f}/s"
        if d["eta_s"] is not None:
            line += f", ETA {format_duration(d['eta_s'])}"
    print(head)
    print(line)
    if d["state"] == "lost":
        print(f"the master is gone: 'orch resume {d['id']}' finishes the run")
    rows = []
    for s in d["shards"]:
        prog = ""
        if s["done"] is not None:
            prog = f"{s['done']:,}" + (f"/{s['total']:,}" if s["total"] else "")
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
    table.render(
        ("SHARD", "STATE", "ATT", "PID", "PROGRESS", "HEARTBEAT", "CPU", "RSS", "REASON"),
        rows,
        state_col=1,
    )


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


def print_summary(store: Store, run_dir: str, out: Any = None, limit: int = 20) -> None:
    """The end-of-run summary: counts, duration, and each failed shard with its reason.

    Reads only the failed shards, so a 100,000-shard run summarises in little memory.
    """
    out = out or sys.stdout
    summary = run_summary(store, run_dir)
    run = store.run()
    end = run.get("ended_at") or time.time()
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
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


# --- logs ----------------------------------------------------------------------


def _log_files(path: str) -> list[str]:
    """Rotated backups oldest first, then the live file."""
    backups = []
    i = 1
    while os.path.exists(f"{path}.{i}"):
        backups.append(f"{path}.{i}")
        i += 1
    return [*reversed(backups), path] if os.path.exists(path) or backups else []


#: Width of the stamp at the start of every log line ("2026-11-26T19:20:01.123Z ").
_STAMP = 25
_PROTOCOL = STDOUT_PREFIX.decode()
_MARK = MARK.decode()


@dataclass(frozen=True, slots=True)
class _Stream:
    """One log file shown by ``orch logs``: its prefix, and what to mark or hide in it."""

    path: str
    prefix: str
    err: bool  # the stderr log
    mark: bool  # its lines marked "[stderr]" (shown beside stdout)
    skip_marks: bool  # attempt markers are also in the stdout log: show them once
    protocol: bool  # show ##orch lines

    def render(self, line: str) -> str | None:
        """The line as shown (prefix, stderr mark), or None when it is hidden."""
        text = line[_STAMP:]
        if text.startswith(_MARK):
            return None if self.skip_marks else self.prefix + line
        if not self.err:
            if not self.protocol and text.startswith(_PROTOCOL):
                return None
            return self.prefix + line
        return f"{self.prefix}{line[:_STAMP]}[stderr] {text}" if self.mark else self.prefix + line


def _lines(stream: _Stream, paths: list[str], stop_at: int | None) -> Iterator[tuple[str, str]]:
    """(timestamp, shown line) for each line; the live file (last) only up to ``stop_at``."""
    for n, p in enumerate(paths):
        limit = stop_at if n == len(paths) - 1 else None
        try:
            with open(p, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
        except FileNotFoundError:
            continue
        for raw in data.splitlines(keepends=True):
            shown = stream.render(raw.decode("utf-8", "replace"))
            if shown is not None:
                yield shown[len(stream.prefix) : len(stream.prefix) + 24], shown


def _shard_rows(store: Store, run_id: str, shard: str | None) -> list[dict[str, Any]]:
    if shard is None:
        return store.shards()
    row = store.shard(shard)
    if row is None and shard.isdigit():
        row = store.shard(int(shard))
    if row is None:
        raise RunNotFound(f"run {run_id} has no shard {shard!r}")
    return [row]


def logs(
    run_key: str,
    *,
    shard: str | None,
    stdout: bool = False,
    stderr: bool = False,
    protocol: bool = False,
    tail: int | None,
    follow: bool,
    home: str | None,
) -> int:
    """Print a run's logs: both streams interleaved in time order by default, stderr
    lines marked ``[stderr]``; ``stdout``/``stderr`` pick one. ``##orch`` lines only
    with ``protocol``."""
    run_dir = find_run(run_key, home)
    store = open_run(run_dir)
    try:
        run_id = store.run()["id"]
        rows = _shard_rows(store, run_id, shard)
    finally:
        store.close()
    want_out, want_err = (stdout, stderr) if stdout or stderr else (True, True)
    many = len(rows) > 1
    streams: list[_Stream] = []
    for r in rows:
        stem = os.path.join(run_dir, LOGS, log_stem(r["idx"], r["id"]))
        prefix = f"[{r['id']}] " if many else ""
        if want_out:
            streams.append(_Stream(stem + ".out", prefix, False, False, False, protocol))
        if want_err:
            streams.append(_Stream(stem + ".err", prefix, True, want_out, want_out, protocol))
    # Sizes first: the dump stops there and -f goes on from there, so no line is lost
    # or printed twice while the shards keep writing.
    sizes = {
        st.path: (os.path.getsize(st.path) if os.path.exists(st.path) else 0) for st in streams
    }
    merged = (
        text
        for _, text in heapq.merge(
            *(_lines(st, _log_files(st.path), sizes[st.path]) for st in streams),
            key=lambda t: t[0],
        )
    )
    out = sys.stdout
    if tail is not None:
        for text in deque(merged, maxlen=max(0, tail)):
            out.write(text)
    else:
        for text in merged:
            out.write(text)
    out.flush()
    if follow:
        _follow(run_dir, streams, sizes)
    return RET_OK


def _follow(
    run_dir: str, streams: list[_Stream], offsets: dict[str, int], poll_s: float = 0.2
) -> None:
    """Print new lines as they are written, until Ctrl-C or the run ends and goes quiet."""
    offsets = dict(offsets)
    inodes = {
        st.path: (os.stat(st.path).st_ino if os.path.exists(st.path) else None) for st in streams
    }
    partial: dict[str, str] = {}
    while True:
        # Looked at before reading, so the lines written just before the end are never missed.
        over = _run_over(run_dir)
        wrote = False
        for stream in streams:
            path = stream.path
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if inodes.get(path) != st.st_ino:  # rotated: start the new file from its top
                inodes[path], offsets[path] = st.st_ino, 0
            if st.st_size <= offsets[path]:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offsets[path])
                chunk = f.read()
                offsets[path] = f.tell()
            text = partial.pop(path, "") + chunk
            lines = text.split("\n")
            if lines[-1]:
                partial[path] = lines[-1]
            for ln in lines[:-1]:
                shown = stream.render(ln + "\n")
                if shown is not None:
                    sys.stdout.write(shown)
                    wrote = True
        if wrote:
            sys.stdout.flush()
        elif over:
            return
        else:
            time.sleep(poll_s)


def _run_over(run_dir: str) -> bool:
    """Whether no line can come any more: the run ended, or its master is gone (lost)."""
    try:
        store = open_run(run_dir)
    except OrchError:
        return False
    try:
        return run_state(store.run()) != "running"
    finally:
        store.close()
