"""How many attempts run at once when ``--jobs`` is not given.

One child per shard, capped at ``DEFAULT_MAX_JOBS`` and at what the
open-files limit allows (the master raises its soft limit to the hard limit
first). A live attempt costs the master its stdout and stderr pipes and,
when it speaks ZeroMQ (the SDK), its heartbeat connection, plus its two log
files while fewer than ``logs.OPEN_LOGS.limit`` log files are open in all
(past that cap, log files are closed and reopened on demand).

The connection counts: libzmq aborts the whole process when ``accept``
fails with "Too many open files" (``src/ipc_listener.cpp``), so a master
whose attempts all connect must never be sized to the pipes alone (the
scale bench lost its master that way at 7,920 heartbeating shards under a
20,000 limit).
"""

from __future__ import annotations

from orchestrator.logs import OPEN_LOGS
from orchestrator.loop import raise_fd_limit

#: Default ceiling on children alive at once when --jobs is not given.
DEFAULT_MAX_JOBS = 1000
#: File descriptors one live attempt can cost the master whatever its logs do: its two
#: pipes and its heartbeat connection.
FDS_PER_ATTEMPT = 3
#: Its two log files, while they fit under the open-log cap.
LOG_FDS_PER_ATTEMPT = 2
#: Descriptors kept for the master itself (sockets, the store, the guardian, the loop).
FD_RESERVE = 64


def fd_ceiling(limit: int, log_cap: int = OPEN_LOGS.limit) -> int:
    """How many attempts ``limit`` descriptors hold: 5 each while their log files fit
    under ``log_cap``, 3 each past it (the capped log files counted once)."""
    return max(
        1,
        (limit - FD_RESERVE) // (FDS_PER_ATTEMPT + LOG_FDS_PER_ATTEMPT),
        (limit - FD_RESERVE - log_cap) // FDS_PER_ATTEMPT,
    )


def default_jobs(count: int, requested: int | None) -> int:
    """--jobs, or one per shard within what the open-files limit allows (raised first)."""
    if requested is not None:
        return requested
    return max(1, min(count, DEFAULT_MAX_JOBS, fd_ceiling(raise_fd_limit())))
