"""The Ray actor that runs one attempt on its node (imported only by ``--backend ray``).

One detached, named actor per attempt (``orch-<run>-<index>-<attempt>``, so
a restarted master finds it with ``ray.get_actor``). It:

- starts the shard's argv as a subprocess in its own session and process
  group (``setsid``), with ``ORCH_NODE`` set to the Ray node id, and a
  parent-death signal so the leader dies with the actor;
- buffers stdout/stderr, handed to the master by ``poll`` (a long poll: it
  returns as soon as there is output or an exit, else after ``wait_s``);
- signals the whole group on request (SIGTERM is followed by SIGCONT);
- reports the exit only once the whole group is gone: leftovers of a group
  whose leader exited get SIGTERM, the grace period, then SIGKILL;
- is its own guardian: every ``poll`` is contact with the master; without
  one for longer than the heartbeat timeout the master is taken for dead
  (or fenced), so the actor stops its group (SIGTERM, grace, SIGKILL) and
  then ends its own process, leaving nothing behind on the node.

The actor is an asyncio actor: one event loop in the worker, no thread per
pipe, calls (poll, signal) served concurrently.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from typing import Any

PR_SET_PDEATHSIG = 1
#: How often the actor looks for a lost master and for a draining group.
TICK_S = 0.1
READ_BYTES = 1 << 16
#: Output held for the master at most; beyond it the oldest bytes are dropped.
MAX_BUFFER_BYTES = 8 << 20


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the actor's thread that forked it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
        if signum == signal.SIGTERM:
            os.killpg(pgid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        pass


class AttemptActor:
    """Runs one attempt; every method is called by the master (or a resumed one)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        master_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        import ray

        self._argv = argv
        self._env = env
        self._cwd = cwd
        self._master_timeout_s = master_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self.node = ray.get_runtime_context().get_node_id()
        self._out = bytearray()
        self._err = bytearray()
        self._code: int | None = None
        self._pgid: int | None = None
        self._changed: asyncio.Event | None = None
        self._contact = time.monotonic()
        self._started = False
        self._orphaned = False
        self._early_signal: int | None = None  # a stop that came before the start

    async def start(self) -> dict[str, Any]:
        """Start the process (once); return where it runs."""
        self._contact = time.monotonic()
        if self._started:
            return {"node": self.node, "pid": self._pgid}
        self._started = True
        self._changed = asyncio.Event()
        if self._early_signal in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            self._code = -self._early_signal  # stopped before it ever ran
            self._changed.set()
            asyncio.get_running_loop().create_task(self._watch_master())
            return {"node": self.node, "pid": None}
        env = dict(self._env)
        env["ORCH_NODE"] = self.node
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self._cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                limit=READ_BYTES,
            )
        except OSError as exc:
            what = f"{self._argv[0]!r} on node {self.node}: {exc.strerror or exc}"
            self._err += f"orch: cannot start {what}\n".encode()
            self._code = 127
            self._changed.set()
            asyncio.get_running_loop().create_task(self._watch_master())
            return {"node": self.node, "pid": None}
        self._pgid = proc.pid
        if self._early_signal is not None:  # came while the process was being started
            _killpg(proc.pid, self._early_signal)
        loop = asyncio.get_running_loop()
        readers = [
            loop.create_task(self._read(proc.stdout, self._out)),
            loop.create_task(self._read(proc.stderr, self._err)),
        ]
        loop.create_task(self._wait(proc, readers))
        loop.create_task(self._watch_master())
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

    async def _wait(self, proc: asyncio.subprocess.Process, readers: list[Any]) -> None:
        """The exit, reported once the leader has exited and the whole group is gone."""
        code = await proc.wait()
        pgid = proc.pid
        if _group_alive(pgid):
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout_s
            while _group_alive(pgid):
                if time.monotonic() >= deadline:
                    _killpg(pgid, signal.SIGKILL)
                await asyncio.sleep(TICK_S)
        # Pipes still held by a process that left the group: stop waiting for them.
        await asyncio.wait(readers, timeout=1.0)
        self._code = code
        assert self._changed is not None
        self._changed.set()

    async def _watch_master(self) -> None:
        """No contact with the master for the heartbeat timeout: stop the group, then go."""
        kill_at = float("inf")
        while True:
            await asyncio.sleep(TICK_S)
            if time.monotonic() - self._contact <= self._master_timeout_s:
                continue
            if self._code is None and self._pgid is not None:
                if not self._orphaned:
                    self._orphaned = True
                    _killpg(self._pgid, signal.SIGTERM)
                    kill_at = time.monotonic() + self._stop_timeout_s
                elif time.monotonic() >= kill_at:
                    _killpg(self._pgid, signal.SIGKILL)
                continue
            os._exit(0)  # the group is gone: nobody will ask for this attempt again

    async def poll(self, wait_s: float) -> dict[str, Any]:
        """Output since the last poll, and the exit code once the group is gone."""
        self._contact = time.monotonic()
        changed = self._changed
        if changed is not None and not self._out and not self._err and self._code is None:
            try:
                await asyncio.wait_for(changed.wait(), wait_s)
            except TimeoutError:
                pass
        if changed is not None:
            changed.clear()
        out, err = bytes(self._out), bytes(self._err)
        self._out.clear()
        self._err.clear()
        self._contact = time.monotonic()
        return {"out": out, "err": err, "code": self._code, "node": self.node}

    async def signal(self, signum: int) -> None:
        self._contact = time.monotonic()
        if self._pgid is None:
            self._early_signal = signum  # acted on by start
        elif self._code is None:
            _killpg(self._pgid, signum)

    async def rss(self) -> int:
        """This actor's own resident memory in bytes (bench/m_ray.py measures the overhead)."""
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
