"""The Ray actor that runs a run's attempts on one node (imported only by ``--backend ray``).

One detached, named host actor per node per run (``orch-<run>-host-<node>``
in namespace ``orch``, ``num_cpus=0``, pinned to its node), started once and
kept for the whole run, so an attempt costs a subprocess, not a Ray worker.
It runs many attempts, keyed by (index, attempt); for each it:

- starts the shard's argv as a subprocess in its own session and process
  group (``setsid``), with ``ORCH_NODE`` set to the Ray node id, and a
  parent-death signal so the leader dies with the host actor;
- buffers stdout/stderr, handed to the master by ``poll`` (one long poll for
  all of the node's attempts: it returns as soon as any has output or an
  exit, else after ``wait_s``);
- signals the whole group on request (SIGTERM is followed by SIGCONT);
- reports the exit only once the whole group is gone: leftovers of a group
  whose leader exited get SIGTERM, the grace period, then SIGKILL. An exit
  is kept until the master acknowledges it (the next poll's ``acked``), so
  a master that dies between poll and answer does not lose it.

The actor is its own guardian: every call is contact with the master;
without one for longer than the heartbeat timeout the master is taken for
dead (or fenced), so the actor stops every group (SIGTERM, grace, SIGKILL)
and ends its own process, leaving nothing behind on the node.

It is an asyncio actor: one event loop in the worker, no thread per pipe,
calls (poll, start, signal) served concurrently.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.procfs import group_alive

PR_SET_PDEATHSIG = 1
#: How often the actor looks for a lost master and for a draining group.
TICK_S = 0.1
READ_BYTES = 1 << 16
#: Output held for the master per attempt at most; beyond it the oldest bytes are dropped.
MAX_BUFFER_BYTES = 8 << 20
STOPS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)

Key = tuple[int, int]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the actor's thread that forked it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
        if signum == signal.SIGTERM:
            os.killpg(pgid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(slots=True)
class _Attempt:
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    pgid: int | None = None
    code: int | None = None
    early_signal: int | None = None  # a stop that came before the process existed


class HostActor:
    """Runs one run's attempts on its node; every method is called by the master."""

    def __init__(self, master_timeout_s: float, stop_timeout_s: float) -> None:
        import ray

        self._master_timeout_s = master_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self.node = ray.get_runtime_context().get_node_id()
        self._attempts: dict[Key, _Attempt] = {}
        self._changed: asyncio.Event | None = None
        self._contact = time.monotonic()
        self._orphaned = False
        self._watching = False

    def _touch(self) -> asyncio.Event:
        self._contact = time.monotonic()
        if self._changed is None:
            self._changed = asyncio.Event()
        if not self._watching:
            self._watching = True
            asyncio.get_running_loop().create_task(self._watch_master())
        return self._changed

    async def start(
        self, index: int, attempt: int, argv: list[str], env: dict[str, str], cwd: str | None
    ) -> dict[str, Any]:
        """Start the attempt's process (once per key); return where it runs."""
        changed = self._touch()
        if self._orphaned:
            raise RuntimeError("this host actor lost its master and is stopping")
        key = (index, attempt)
        att = self._attempts.get(key)
        if att is not None and (att.pgid is not None or att.code is not None):
            return {"node": self.node, "pid": att.pgid}
        if att is None:
            att = self._attempts[key] = _Attempt()
        if att.early_signal in STOPS:
            att.code = -att.early_signal  # stopped before it ever ran
            changed.set()
            return {"node": self.node, "pid": None}
        full_env = dict(env)
        full_env["ORCH_NODE"] = self.node
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                limit=READ_BYTES,
            )
        except OSError as exc:
            what = f"{argv[0]!r} on node {self.node}: {exc.strerror or exc}"
            att.err += f"orch: cannot start {what}\n".encode()
            att.code = 127
            changed.set()
            return {"node": self.node, "pid": None}
        att.pgid = proc.pid
        if att.early_signal is not None:  # came while the process was being started
            _killpg(proc.pid, att.early_signal)
        loop = asyncio.get_running_loop()
        readers = [
            loop.create_task(self._read(proc.stdout, att.out)),
            loop.create_task(self._read(proc.stderr, att.err)),
        ]
        loop.create_task(self._wait(att, proc, readers))
        return {"node": self.node, "pid": proc.pid}

    async def _read(self, stream: asyncio.StreamReader | None, buf: bytearray) -> None:
        if stream is None:
            return
        while True:
            data = await stream.read(READ_BYTES)
            if not data:
                return
            buf += data
            if len(buf) > MAX_BUFFER_BYTES:
                del buf[: len(buf) - MAX_BUFFER_BYTES]
            assert self._changed is not None
            self._changed.set()

    async def _wait(
        self, att: _Attempt, proc: asyncio.subprocess.Process, readers: list[Any]
    ) -> None:
        """The exit, reported once the leader has exited and the whole group is gone."""
        code = await proc.wait()
        pgid = proc.pid
        if group_alive(pgid):
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout_s
            while group_alive(pgid):
                if time.monotonic() >= deadline:
                    _killpg(pgid, signal.SIGKILL)
                await asyncio.sleep(TICK_S)
        # Pipes still held by a process that left the group: stop waiting for them.
        await asyncio.wait(readers, timeout=1.0)
        att.code = code
        assert self._changed is not None
        self._changed.set()

    def _running(self) -> list[int]:
        return [a.pgid for a in self._attempts.values() if a.code is None and a.pgid is not None]

    async def _watch_master(self) -> None:
        """No contact with the master for the heartbeat timeout: stop every group, then go."""
        kill_at = float("inf")
        while True:
            await asyncio.sleep(TICK_S)
            if not self._orphaned and time.monotonic() - self._contact <= self._master_timeout_s:
                continue
            running = self._running()
            if running:
                if not self._orphaned:
                    self._orphaned = True
                    for pgid in running:
                        _killpg(pgid, signal.SIGTERM)
                    kill_at = time.monotonic() + self._stop_timeout_s
                elif time.monotonic() >= kill_at:
                    for pgid in running:
                        _killpg(pgid, signal.SIGKILL)
                continue
            os._exit(0)  # every group is gone: nobody will ask for these attempts again

    async def poll(self, wait_s: float, acked: list[list[int]] | None = None) -> dict[str, Any]:
        """Output of every attempt since the last poll, and the exits of those whose group
        is gone (kept until ``acked`` by a later poll): ``{"node", "attempts": [[index,
        attempt, out, err, code], ...]}``."""
        changed = self._touch()
        for index, attempt in acked or ():
            att = self._attempts.get((index, attempt))
            if att is not None and att.code is not None:
                del self._attempts[(index, attempt)]
        if not self._pending():
            try:
                await asyncio.wait_for(changed.wait(), wait_s)
            except TimeoutError:
                pass
        changed.clear()
        report = []
        for (index, attempt), att in self._attempts.items():
            if att.out or att.err or att.code is not None:
                report.append([index, attempt, bytes(att.out), bytes(att.err), att.code])
                att.out.clear()
                att.err.clear()
        self._contact = time.monotonic()
        return {"node": self.node, "attempts": report}

    def _pending(self) -> bool:
        return any(a.out or a.err or a.code is not None for a in self._attempts.values())

    async def signal(self, index: int, attempt: int, signum: int) -> None:
        self._touch()
        att = self._attempts.get((index, attempt))
        if att is None:
            att = self._attempts[(index, attempt)] = _Attempt(early_signal=signum)
            return  # acted on by start
        if att.pgid is None:
            att.early_signal = signum
        elif att.code is None:
            _killpg(att.pgid, signum)

    async def alive(self) -> list[list[int]]:
        """Keys of the attempts a (resumed) master can take back: running, or ended with
        their exit not yet acknowledged."""
        self._touch()
        if self._orphaned:
            return []
        return [[i, a] for (i, a), att in self._attempts.items() if att.pgid is not None]

    async def rss(self) -> int:
        """This actor's own resident memory in bytes (bench/m_ray.py measures the overhead)."""
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
