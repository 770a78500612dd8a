"""How many attempts run at once when ``--jobs`` is not given.

One child per shard, capped at ``DEFAULT_MAX_JOBS`` and at what the
open-files limit allows (the master raises its soft limit to the hard limit
first). A live attempt costs the master its stdout and stderr pipes, plus
its two log files while fewer than ``logs.OPEN_LOGS.limit`` log files are
open in all (past that cap, log files are closed and reopened on demand).
"""

from __future__ import annotations

from orchestrator.logs import OPEN_LOGS
from orchestrator.loop import raise_fd_limit

#: Default ceiling on children alive at once when --jobs is not given.
DEFAULT_MAX_JOBS = 1000
#: File descriptors one live attempt always costs the master: its two pipes.
FDS_PER_ATTEMPT = 2
#: Descriptors kept for the master itself (sockets, the store, the guardian, the loop).
FD_RESERVE = 64


def fd_ceiling(limit: int, log_cap: int = OPEN_LOGS.limit) -> int:
    """How many attempts ``limit`` descriptors hold: 4 each while their log files fit
    under ``log_cap``, 2 each past it (the capped log files counted once)."""
    return max(
        1,
        (limit - FD_RESERVE) // (2 * FDS_PER_ATTEMPT),
        (limit - FD_RESERVE - log_cap) // FDS_PER_ATTEMPT,
    )


def default_jobs(count: int, requested: int | None) -> int:
    """--jobs, or one per shard within what the open-files limit allows (raised first)."""
    if requested is not None:
        return requested
    return max(1, min(count, DEFAULT_MAX_JOBS, fd_ceiling(raise_fd_limit())))
