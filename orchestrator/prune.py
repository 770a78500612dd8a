"""Pruning finished runs: ``orch gc`` and the ``[gc]`` table.

A run is removed only when it is certainly not live: its state is final
(done, failed, stopped) or it is lost (recorded as running or pending but its
master is gone), the run's master lock can be taken, and no deliverer is
still sending its notifications (``notify.lock``). A run whose master is not
recorded yet is being created (``orch run`` locks it just after creating its
database) and is left alone for ``STARTING_S``. The lock is held
while the directory is removed, so an ``orch resume`` of that run in the same
instant is refused instead of starting on a half-deleted directory.

Which runs: newest first by start, ``keep`` skips the newest N removable runs;
``older_than`` keeps runs that ended (or, for lost runs, last changed) less
than that long ago; both given, a run must pass both. Neither given keeps the
newest ``DEFAULT_KEEP``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import OrchError
from orchestrator.units import format_bytes, parse_duration

__all__ = ["DEFAULT_KEEP", "Removable", "collect", "gc_command", "plan"]

DEFAULT_KEEP = 20
#: A run with no master recorded yet is taken as starting, not lost, for this long.
STARTING_S = 600.0
_FINAL = ("done", "failed", "stopped")
_STATE_DB = "state.db"
_LOCK = "master.lock"


@dataclass(frozen=True, slots=True)
class Removable:
    """A run that may be removed: its directory, id, name, state and when it ended."""

    run_dir: str
    run_id: str
    name: str
    state: str
    ended_at: float


def _run_facts(run_dir: str, alive: Callable[[dict[str, Any]], bool]) -> Removable | None:
    """The run as a removal candidate, or None when it is (or may be) live or unreadable."""
    from orchestrator.store import Store, StoreError

    try:
        store = Store.open(os.path.join(run_dir, _STATE_DB), readonly=True)
    except StoreError:
        return None
    try:
        run = store.run()
    except StoreError:
        return None
    finally:
        store.close()
    state = str(run.get("state") or "running")
    if state not in _FINAL:
        if alive(run):
            return None
        if not run.get("master_pid") and time.time() - float(run["started_at"]) < STARTING_S:
            return None  # being created: its master is not recorded (or locked) yet
        state = "lost"
    ended = run.get("ended_at")
    if ended is None:
        ended = _newest_mtime(run_dir)
    return Removable(run_dir, str(run["id"]), str(run.get("name") or ""), state, float(ended))


def _newest_mtime(run_dir: str) -> float:
    newest = 0.0
    for entry in (_STATE_DB, _STATE_DB + "-wal", "master.log"):
        try:
            newest = max(newest, os.stat(os.path.join(run_dir, entry)).st_mtime)
        except OSError:
            continue
    return newest


def plan(
    home: str,
    *,
    keep: int | None,
    older_than_s: float | None,
    now: float,
    alive: Callable[[dict[str, Any]], bool] | None = None,
) -> list[Removable]:
    """The runs ``orch gc`` would remove, newest first."""
    from orchestrator.runs import list_runs, master_alive

    check = master_alive if alive is None else alive
    if keep is None and older_than_s is None:
        keep = DEFAULT_KEEP
    candidates = [
        r
        for r in (_run_facts(d, check) for d in (r.path for r in list_runs(home)))
        if r is not None
    ]
    if keep is not None:
        candidates = candidates[keep:]
    if older_than_s is not None:
        candidates = [r for r in candidates if now - r.ended_at >= older_than_s]
    return candidates


def dir_bytes(path: str) -> int:
    """Bytes of the files below ``path`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def remove(run: Removable) -> int | None:
    """Remove one run under its master lock; bytes freed, or None when a master took it."""
    try:
        fd = os.open(os.path.join(run.run_dir, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None  # removed by someone else meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        from orchestrator.notify.deliver import deliverer_running

        if deliverer_running(run.run_dir):
            return None  # its last notifications are still being sent: next time
        size = dir_bytes(run.run_dir)
        shutil.rmtree(run.run_dir)
        return size
    finally:
        os.close(fd)


def collect(
    home: str, *, keep: int | None, older_than_s: float | None, dry_run: bool = False
) -> tuple[list[tuple[Removable, int]], int]:
    """Remove (or with ``dry_run`` only measure) the planned runs: [(run, bytes)], total bytes."""
    done: list[tuple[Removable, int]] = []
    for run in plan(home, keep=keep, older_than_s=older_than_s, now=time.time()):
        size = dir_bytes(run.run_dir) if dry_run else remove(run)
        if size is not None:
            done.append((run, size))
    return done, sum(size for _, size in done)


def gc_command(home: str | None, keep: int | None, older_than: str | None, dry_run: bool) -> int:
    """``orch gc``: prints one line per removed run, then the count and bytes freed."""
    from orchestrator.runs import home_dir

    if keep is not None and keep < 0:
        raise OrchError(f"--keep: expected an integer >= 0, got {keep}")
    older_s = parse_duration(older_than, where="--older-than") if older_than is not None else None
    root = home_dir(home)
    removed, total = collect(root, keep=keep, older_than_s=older_s, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for run, size in removed:
        label = f" ({run.name})" if run.name and run.name != run.run_id else ""
        print(f"{verb} {run.run_id}{label}: {run.state}, {format_bytes(size)}")
    runs = "run" if len(removed) == 1 else "runs"
    freed = "would free" if dry_run else "freed"
    print(f"{verb} {len(removed)} {runs}, {freed} {format_bytes(total)}")
    sys.stdout.flush()
    return 0
