"""What orch reads about processes, in one place: /proc first, psutil where there is none.

Used by the master (group and escapee checks), the guardian, resume's
leftover hunt and ``orch status`` (CPU, memory, whether a master lives).
Every reader tolerates a process that vanishes between two reads: it then
answers as if the process were gone.

Reading /proc directly is the fast path (``orch status`` samples 100
processes in a few milliseconds, and the module costs nothing to import).
On a system without /proc the same answers come from psutil, imported only
then. A start time is an opaque number that, with the pid, names one
process: clock ticks since boot from /proc, psutil's creation time
otherwise; it is only ever compared with one read on the same machine.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Whether this system has a Linux-style /proc (else the psutil fallbacks answer).
HAVE_PROC = os.path.exists("/proc/self/stat")


def _psutil_process(pid: int) -> Any:
    """A psutil.Process for a live, non-zombie ``pid``, or None (the fallback path only)."""
    import psutil  # only without /proc: keeps `orch status` and the master lean

    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
    except (psutil.Error, OSError):
        return None
    return proc


def stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` after the command name: [0] state, [1] ppid, [2] pgrp, ...

    Field N of proc(5) is index N - 3 (utime 11, stime 12, starttime 19, rss 21).
    """
    # os.open/os.read rather than open(): no buffered file object per call, which is
    # most of the cost when ``orch status`` samples thousands of shards.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> float | None:
    """Start time of ``pid`` (zombies included): pid plus this is unique."""
    if not HAVE_PROC:
        return _ps_start_time(pid, live=False)
    fields = stat_fields(pid)
    return float(fields[19]) if fields else None


def live_start_time(pid: int) -> float | None:
    """Start time of ``pid`` if it is a live process (not a zombie), else None."""
    if not HAVE_PROC:
        return _ps_start_time(pid, live=True)
    fields = stat_fields(pid)
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return float(fields[19])


def _ps_start_time(pid: int, *, live: bool) -> float | None:
    import psutil  # only without /proc (see _psutil_process)

    try:
        proc = _psutil_process(pid) if live else psutil.Process(pid)
        return None if proc is None else float(proc.create_time())
    except (psutil.Error, OSError):
        return None


def exists(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    if not HAVE_PROC:
        return _psutil_process(pid) is not None
    fields = stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in (b"Z", b"X")


def process_group(pid: int) -> int | None:
    """The process group of ``pid``, or None when it is gone."""
    if not HAVE_PROC:
        try:
            return os.getpgid(pid)
        except OSError:
            return None
    fields = stat_fields(pid)
    return int(fields[2]) if fields else None


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def environ(pid: int) -> set[bytes]:
    """``KEY=VALUE`` entries of ``pid``'s environment (empty when unreadable)."""
    if not HAVE_PROC:
        proc = _psutil_process(pid)
        try:
            env = proc.environ() if proc is not None else {}
        except Exception:  # noqa: BLE001 - psutil.Error or OSError: unreadable means empty
            return set()
        return {f"{k}={v}".encode() for k, v in env.items()}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return set(f.read().split(b"\0"))
    except OSError:
        return set()


def with_env(marks: set[bytes], pids: list[int] | None = None) -> list[int]:
    """Live processes (among ``pids``, else all) whose environment has every entry of ``marks``."""
    me = os.getpid()
    if pids is None:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()] if HAVE_PROC else _ps_pids()
    return [p for p in pids if p != me and marks <= environ(p) and exists(p)]


def _ps_pids() -> list[int]:
    import psutil  # only without /proc (see _psutil_process)

    return list(psutil.pids())


def own_children() -> set[int]:
    """Direct children of this process, from /proc/self/task/*/children."""
    if not HAVE_PROC:
        proc = _psutil_process(os.getpid())
        return {c.pid for c in proc.children()} if proc is not None else set()
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def uptime() -> float:
    """Seconds since boot, the clock of /proc's start times (CLOCK_BOOTTIME: no file read)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def cpu_and_rss(pid: int, now_uptime: float | None = None) -> tuple[float | None, int | None]:
    """CPU percent of one core averaged over the process's life, and its RSS in bytes."""
    if not HAVE_PROC:
        return _ps_cpu_and_rss(pid)
    fields = stat_fields(pid)
    if not fields:
        return None, None
    try:
        cpu_s = (int(fields[11]) + int(fields[12])) / TICKS
        age = max(
            1e-3, (now_uptime if now_uptime is not None else uptime()) - int(fields[19]) / TICKS
        )
        rss = int(fields[21]) * PAGE
    except (ValueError, IndexError):
        return None, None
    return round(100.0 * cpu_s / age, 1), rss


def _ps_cpu_and_rss(pid: int) -> tuple[float | None, int | None]:
    proc = _psutil_process(pid)
    if proc is None:
        return None, None
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            age = max(1e-3, time.time() - proc.create_time())
            rss = int(proc.memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil.Error or OSError: the process went away
        return None, None
    return round(100.0 * (times.user + times.system) / age, 1), rss


def signal_pids(pids: list[int] | set[int], *signums: int) -> None:
    for pid in pids:
        for signum in signums:
            try:
                os.kill(pid, signum)
            except OSError:
                pass


def signal_groups(pgids: set[int], *signums: int) -> None:
    for pgid in pgids:
        for signum in signums:
            try:
                os.killpg(pgid, signum)
            except OSError:
                pass


TERM_THEN_CONT = (signal.SIGTERM, signal.SIGCONT)
