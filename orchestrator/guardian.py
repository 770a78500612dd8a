"""The guardian: stops every attempt of a run when its master dies without warning.

A graceful master stops its shards itself. A master killed with SIGKILL
cannot, and ``posix_spawn`` leaves no way to set a parent-death signal in
the children. So at start the master starts this small process in its own
session, and keeps the write end of a pipe to it.
The master writes ``+PGID`` when an attempt starts and ``-PGID`` when its
group is gone (batched, once per loop iteration), and ``=`` when it has
stopped everything itself. When the pipe reaches EOF, the master is gone: if groups are
still listed, the guardian sends them SIGTERM (and SIGCONT), and likewise every
process that carries the run's ``ORCH_RUN_ID`` (a daemon that left its
group), waits the grace period, then SIGKILLs what is left. It ignores SIGINT, SIGTERM and SIGHUP so
that whatever killed the master does not take it along first.

SDK shards also watch the master themselves (docs/protocol.md); the
guardian is what covers shards that know nothing of orch, and their
grandchildren.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from orchestrator import procfs


def _guard(read_fd: int, grace_s: float, run_id: str) -> None:
    groups: set[int] = set()
    clean = False
    buf = b""
    while True:
        try:
            data = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line == b"=":
                clean = True  # the master stopped every attempt itself
            elif len(line) >= 2 and line[:1] in b"+-":
                pgid = int(line[1:])
                if line[:1] == b"+":
                    groups.add(pgid)
                else:
                    groups.discard(pgid)
    if clean:
        return
    # The master died. Its last few spawns may not have been announced yet (it
    # writes once per loop iteration), so every process carrying the run's
    # ORCH_RUN_ID is a target as well as the groups it knew of.
    live = {g for g in groups if procfs.group_alive(g)}
    strays = set(procfs.with_env({f"ORCH_RUN_ID={run_id}".encode()}))
    procfs.signal_groups(live, *procfs.TERM_THEN_CONT)
    procfs.signal_pids(strays, *procfs.TERM_THEN_CONT)
    deadline = time.monotonic() + grace_s
    while (live or strays) and time.monotonic() < deadline:
        time.sleep(0.05)
        live = {g for g in live if procfs.group_alive(g)}
        strays = {p for p in strays if procfs.exists(p)}
    procfs.signal_groups(live, signal.SIGKILL)
    procfs.signal_pids(strays, signal.SIGKILL)


class Guardian:
    """The master's end of the guardian pipe.

    The guardian is ``python -m orchestrator.guardian FD GRACE RUN_ID``, its own
    program (``ps`` tells it from the master), started with ``posix_spawn``.
    """

    def __init__(self, grace_s: float, run_id: str) -> None:
        read_fd, write_fd = os.pipe()  # both close-on-exec: the guardian gets the read end
        os.set_inheritable(read_fd, True)
        argv = [sys.executable, "-m", "orchestrator.guardian", str(read_fd), f"{grace_s:g}", run_id]
        # posix_spawn (vfork + exec), not fork: the master's page tables are not copied and
        # its next writes take no copy-on-write faults while the guardian starts.
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(read_fd)
        self.pid = pid
        self._fd: int | None = write_fd
        self._pending: list[str] = []

    def _send(self, text: str) -> None:
        if self._fd is None:
            return
        self._pending.append(text)

    def flush(self) -> None:
        """Write what was queued since the last flush: one write per loop iteration."""
        if self._fd is None or not self._pending:
            return
        data, self._pending = "".join(self._pending).encode(), []
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            self._fd = None  # the guardian is gone; SDK shards still watch the master

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self, clean: bool = True) -> None:
        """Let go of the guardian. ``clean``: every attempt is gone, it has nothing to do;
        otherwise (the master is failing) it stops whatever of the run is left."""
        if self._fd is not None:
            if clean:
                self._pending.append("=\n")
            self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def main(argv: list[str]) -> None:
    read_fd, grace_s, run_id = int(argv[0]), float(argv[1]), argv[2]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    os.closerange(3, read_fd)
    os.closerange(read_fd + 1, 1 << 16)
    _guard(read_fd, grace_s, run_id)


if __name__ == "__main__":
    main(sys.argv[1:])
