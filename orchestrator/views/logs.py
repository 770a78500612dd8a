"""``orch logs``: one shard's output, or all shards interleaved by timestamp; ``-f`` follows.

Works from any terminal, live or ended: it reads the log files (rotated
backups first) and, to know when to stop following, the run's database.
"""

from __future__ import annotations

import heapq
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from orchestrator.errors import RET_OK, OrchError, RunNotFound
from orchestrator.runs import RunDir, find_run, run_state
from orchestrator.store import Store


def _log_files(path: str) -> list[str]:
    """Rotated backups oldest first, then the live file."""
    backups = []
    i = 1
    while os.path.exists(f"{path}.{i}"):
        backups.append(f"{path}.{i}")
        i += 1
    return [*reversed(backups), path] if os.path.exists(path) or backups else []


def _lines(paths: list[str], prefix: str, stop_at: int | None = None) -> Iterator[tuple[str, str]]:
    """(timestamp, prefixed line) for each line; the live file (last) only up to ``stop_at``."""
    for n, p in enumerate(paths):
        limit = stop_at if n == len(paths) - 1 else None
        try:
            with open(p, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
        except FileNotFoundError:
            continue
        for raw in data.splitlines(keepends=True):
            line = raw.decode("utf-8", "replace")
            yield line[:24], prefix + line


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
    stderr: bool,
    tail: int | None,
    follow: bool,
    home: str | None,
) -> int:
    run_dir = find_run(run_key, home)
    store = run_dir.read()
    try:
        run_id = store.run()["id"]
        rows = _shard_rows(store, run_id, shard)
    finally:
        store.close()
    ext = ".err" if stderr else ".out"
    many = len(rows) > 1
    files = [
        (run_dir.log_path(r["idx"], r["id"], ext), f"[{r['id']}] " if many else "") for r in rows
    ]
    # Sizes first: the dump stops there and -f goes on from there, so no line is lost
    # or printed twice while the shards keep writing.
    sizes = {path: (os.path.getsize(path) if os.path.exists(path) else 0) for path, _ in files}
    streams = [_lines(_log_files(path), prefix, sizes[path]) for path, prefix in files]
    merged = (text for _, text in heapq.merge(*streams, key=lambda t: t[0]))
    out = sys.stdout
    if tail is not None:
        for text in deque(merged, maxlen=max(0, tail)):
            out.write(text)
    else:
        for text in merged:
            out.write(text)
    out.flush()
    if follow:
        _follow(run_dir, files, sizes)
    return RET_OK


def _follow(
    run_dir: RunDir, files: list[tuple[str, str]], offsets: dict[str, int], poll_s: float = 0.2
) -> None:
    """Print new lines as they are written, until Ctrl-C or the run ends and goes quiet."""
    offsets = dict(offsets)
    inodes = {p: (os.stat(p).st_ino if os.path.exists(p) else None) for p, _ in files}
    partial: dict[str, str] = {}
    while True:
        # Looked at before reading, so the lines written just before the end are never missed.
        over = _run_over(run_dir)
        wrote = False
        for path, prefix in files:
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
                sys.stdout.write(prefix + ln + "\n")
                wrote = True
        if wrote:
            sys.stdout.flush()
        elif over:
            return
        else:
            time.sleep(poll_s)


def _run_over(run_dir: RunDir) -> bool:
    """Whether no line can come any more: the run ended, or its master is gone (lost)."""
    try:
        store = run_dir.read()
    except OrchError:
        return False
    try:
        return run_state(store.run()) != "running"
    finally:
        store.close()
