"""``orch logs``: one shard's output, or all shards interleaved by timestamp; ``-f`` follows.

Both streams of a shard are shown interleaved in time order, stderr lines
marked ``[stderr]``; ``--stdout``/``--stderr`` pick one. ``##orch`` protocol
lines are hidden unless asked for. Works from any terminal, live or ended: it
reads the log files (rotated backups first) and, to know when to stop
following, the run's database.
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

from orchestrator.errors import RET_OK, OrchError, RunNotFound
from orchestrator.logs import MARK
from orchestrator.runs import RunDir, find_run, run_state
from orchestrator.store import Store
from shards.protocol import STDOUT_PREFIX


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
    store = run_dir.read()
    try:
        run_id = store.run()["id"]
        rows = _shard_rows(store, run_id, shard)
    finally:
        store.close()
    want_out, want_err = (stdout, stderr) if stdout or stderr else (True, True)
    many = len(rows) > 1
    streams: list[_Stream] = []
    for r in rows:
        prefix = f"[{r['id']}] " if many else ""
        out_log, err_log = (run_dir.log_path(r["idx"], r["id"], ext) for ext in (".out", ".err"))
        if want_out:
            streams.append(_Stream(out_log, prefix, False, False, False, protocol))
        if want_err:
            streams.append(_Stream(err_log, prefix, True, want_out, want_out, protocol))
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
    run_dir: RunDir, streams: list[_Stream], offsets: dict[str, int], poll_s: float = 0.2
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
