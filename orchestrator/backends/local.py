"""The local backend: attempts are child processes of the master.

- Each attempt is started with ``os.posix_spawn`` (vfork + exec in glibc, so
  the cost does not grow with the master's memory) in a new session, so it
  leads its own process group and stopping it is ``killpg``.
- The master is a child subreaper (``PR_SET_CHILD_SUBREAPER``): grandchildren
  whose parent died are re-parented to the master, not to init, so their
  deaths also arrive as SIGCHLD and the master knows when a group is empty.
- Exits are observed by event: SIGCHLD wakes the loop, which reaps with
  ``waitpid(-1, WNOHANG)`` until nothing is left, tolerating pids it does not
  know (re-parented grandchildren) and ECHILD. No thread per child, no timer.
- An attempt is reported ended only once its leader has exited AND its
  whole process group is gone; leftovers of a group whose leader exited get
  SIGTERM, a grace period, then SIGKILL. So a new attempt never overlaps any
  process of the previous one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator import procfs
from orchestrator.backends import AttemptHandle, AttemptSpec, Backend, Listener, Stream
from orchestrator.errors import SpawnError
from orchestrator.loop import Loop

PR_SET_CHILD_SUBREAPER = 36
F_SETPIPE_SZ = 1031
#: Budget for the stdout pipes of all live attempts together (Linux's default
#: per-user soft limit on pipe buffers is 64 MiB; stay well inside it).
PIPE_BUDGET_BYTES = 32 << 20
MIN_PIPE_BYTES = 1 << 16
MAX_PIPE_BYTES = 1 << 20


def pipe_bytes_for(jobs: int) -> int:
    """A stdout pipe size for ``jobs`` live attempts: bigger pipes mean fewer, larger reads
    for chatty shards (and fewer stalls of a shard waiting on a full pipe)."""
    size = max(MIN_PIPE_BYTES, min(MAX_PIPE_BYTES, PIPE_BUDGET_BYTES // max(1, jobs)))
    return 1 << (size.bit_length() - 1)


#: How often a draining group (leader gone, members left) is re-checked when no SIGCHLD comes.
DRAIN_POLL_S = 0.25

#: Signals whose disposition the master changes; reset to default in every child.
_RESET_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def resolve_executable(argv0: str, env_path: str | None, cwd: str | None) -> str:
    """The path ``posix_spawn`` should exec, or SpawnError in plain words."""
    if not argv0:
        raise SpawnError("empty command")
    if "/" in argv0:
        path = argv0 if os.path.isabs(argv0) else os.path.join(cwd or os.getcwd(), argv0)
        if not os.path.exists(path):
            raise SpawnError(f"executable not found: {argv0!r}")
        if os.path.isdir(path):
            raise SpawnError(f"permission denied: {argv0!r} is a directory")
        if not os.access(path, os.X_OK):
            raise SpawnError(f"permission denied: {argv0!r} is not executable")
        return path
    found = shutil.which(argv0, path=env_path if env_path is not None else os.defpath)
    if found is None:
        raise SpawnError(f"executable not found: {argv0!r} (not on PATH)")
    return found


@dataclass(slots=True)
class _Local:
    handle: AttemptHandle
    out_fd: int | None
    err_fd: int | None
    code: int | None = None  # leader's exit, once reaped
    draining: bool = False
    term_sent: bool = False
    extra: list[int] = field(default_factory=list)


class LocalBackend(Backend):
    def __init__(self, loop: Loop, *, stop_timeout_s: float = 10.0, jobs: int = 1) -> None:
        self._loop = loop
        self.pipe_bytes = pipe_bytes_for(jobs)
        self._stop_timeout_s = stop_timeout_s
        self._by_pid: dict[int, _Local] = {}
        self._draining: dict[int, _Local] = {}
        self._resolved: dict[tuple[str, str | None, str | None], str] = {}
        self._here: dict[str, bool] = {}
        self._unstamped: list[AttemptHandle] = []
        self._unwatched: list[_Local] = []
        self.subreaper = become_subreaper()
        self.reaped_unknown = 0

    @property
    def _listener(self) -> Listener:
        assert self.listener is not None, "bind() the backend to the master first"
        return self.listener

    # --- starting ---------------------------------------------------------

    def start(self, spec: AttemptSpec) -> AttemptHandle:
        cwd = spec.cwd
        if cwd is not None and not self._is_here(cwd):
            if not os.path.isdir(cwd):
                raise SpawnError(f"cwd does not exist: {cwd!r}")
            # posix_spawn cannot chdir before 3.13: go through env(1) -C, no shell involved.
            exe = resolve_executable(spec.argv[0], spec.env.get("PATH"), cwd)
            argv = ["env", "-C", cwd, "--", exe, *spec.argv[1:]]
            path = resolve_executable("env", os.environ.get("PATH"), None)
        else:
            key = (spec.argv[0], spec.env.get("PATH"), cwd)
            path = self._resolved.get(key) or resolve_executable(*key)
            self._resolved[key] = path
            argv = list(spec.argv)
        try:
            out_r, out_w = os.pipe()
        except OSError as exc:
            raise SpawnError(_spawn_reason(exc, spec.argv[0]), transient=True) from None
        if self.pipe_bytes > MIN_PIPE_BYTES:
            try:
                fcntl.fcntl(out_w, F_SETPIPE_SZ, self.pipe_bytes)
            except OSError:
                pass  # over the per-user pipe limit: the default size still works
        try:
            err_r, err_w = os.pipe()
        except OSError as exc:
            os.close(out_r)
            os.close(out_w)
            raise SpawnError(_spawn_reason(exc, spec.argv[0]), transient=True) from None
        try:
            pid = os.posix_spawn(
                path,
                argv,
                spec.env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsid=True,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            transient = exc.errno in _TRANSIENT
            raise SpawnError(_spawn_reason(exc, spec.argv[0]), transient=transient) from None
        except ValueError as exc:  # a NUL byte in an argument or the environment
            for fd in (out_r, err_r):
                os.close(fd)
            raise SpawnError(f"{exc} in the arguments or environment ({spec.argv[0]!r})") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        # The start time (for resume's pid checks) is read after the spawn batch, in the
        # master's idle pass, so that starting 1,000 children is 1,000 spawns and no more.
        handle = AttemptHandle(spec=spec, pid=pid, pgid=pid, create_time=None)
        local = _Local(handle=handle, out_fd=out_r, err_fd=err_r)
        self._by_pid[pid] = local
        self._unstamped.append(handle)
        # The pipes are watched from the end of this loop iteration (before the loop selects
        # again): registering them is no work for the spawns still to come in the batch.
        if not self._unwatched:
            self._loop.call_when_idle(self._watch_pipes)
        self._unwatched.append(local)
        return handle

    def _watch_pipes(self) -> None:
        """Watch the pipes of the attempts started since the last call (still open: an
        attempt whose exit came first had its pipes drained and closed by ``_finish``)."""
        locals_, self._unwatched = self._unwatched, []
        add_reader = self._loop.add_reader
        for local in locals_:
            if local.out_fd is not None:
                add_reader(local.out_fd, self._reader(local, Stream.STDOUT))
            if local.err_fd is not None:
                add_reader(local.err_fd, self._reader(local, Stream.STDERR))

    def _is_here(self, cwd: str) -> bool:
        """Whether ``cwd`` is the master's own directory (asked once per directory)."""
        here = self._here.get(cwd)
        if here is None:
            here = self._here[cwd] = os.path.realpath(cwd) == os.path.realpath(os.getcwd())
        return here

    def _reader(self, local: _Local, stream: Stream) -> Callable[[], None]:
        def on_readable() -> None:
            self._read(local, stream)

        return on_readable

    def _read(self, local: _Local, stream: Stream, drain: bool = False) -> None:
        fd = local.out_fd if stream is Stream.STDOUT else local.err_fd
        if fd is None:
            return
        while True:
            try:
                data = os.read(fd, self.pipe_bytes)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._loop.remove_reader(fd)
                os.close(fd)
                if stream is Stream.STDOUT:
                    local.out_fd = None
                else:
                    local.err_fd = None
                return
            self._listener.on_output(local.handle, stream, data)
            if not drain:
                return

    # --- signals and exits ------------------------------------------------

    def signal(self, handle: AttemptHandle, signum: int) -> None:
        if handle.pgid is None:
            return
        try:
            os.killpg(handle.pgid, signum)
            if signum == signal.SIGTERM:
                # A stopped (SIGSTOP) process acts on SIGTERM only once continued.
                os.killpg(handle.pgid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        """Collect every exited child; call on SIGCHLD."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            local = self._by_pid.get(pid)
            if local is None:
                self.reaped_unknown += 1
                continue
            local.code = os.waitstatus_to_exitcode(status)
            self._draining[pid] = local
        self._check_draining()

    def _check_draining(self) -> None:
        for pid, local in list(self._draining.items()):
            escaped = self._escapees(local)
            if procfs.group_alive(pid) or escaped:
                if not local.draining:
                    local.draining = True
                    self.signal(local.handle, signal.SIGTERM)
                    procfs.signal_pids(escaped, signal.SIGTERM, signal.SIGCONT)
                    self._loop.timers.set(
                        ("drain-kill", pid),
                        self._loop.clock() + self._stop_timeout_s,
                        functools.partial(self._kill_all_of, local),
                    )
                self._loop.timers.set(
                    ("drain-poll", pid), self._loop.clock() + DRAIN_POLL_S, self._check_draining
                )
                continue
            del self._draining[pid]
            self._loop.timers.cancel(("drain-kill", pid))
            self._loop.timers.cancel(("drain-poll", pid))
            self._finish(local)

    def _kill_all_of(self, local: _Local) -> None:
        self.signal(local.handle, signal.SIGKILL)
        procfs.signal_pids(self._escapees(local), signal.SIGKILL)

    def _escapees(self, local: _Local) -> list[int]:
        """Live processes of this attempt that left its process group (``setsid`` daemons).

        The master is a subreaper, so once their parents are gone they are its
        own children: only those are looked at, and only the ones that carry
        this attempt's ORCH_RUN_ID, ORCH_SHARD_ID and ORCH_ATTEMPT.
        """
        if not self.subreaper:
            return []
        unknown = [p for p in procfs.own_children() if p not in self._by_pid]
        if not unknown:
            return []
        env = local.handle.spec.env
        marks = {
            f"{key}={env.get(key, '')}".encode()
            for key in ("ORCH_RUN_ID", "ORCH_SHARD_ID", "ORCH_ATTEMPT")
        }
        return procfs.with_env(marks, unknown)

    def _finish(self, local: _Local) -> None:
        self._read(local, Stream.STDOUT, drain=True)
        self._read(local, Stream.STDERR, drain=True)
        for fd in (local.out_fd, local.err_fd):
            if fd is not None:
                # Held open by a process that left the group: stop listening.
                self._loop.remove_reader(fd)
                os.close(fd)
        local.out_fd = local.err_fd = None
        pid = local.handle.pid
        assert pid is not None and local.code is not None
        del self._by_pid[pid]
        self._listener.on_exit(local.handle, local.code)

    def live(self) -> list[AttemptHandle]:
        return [local.handle for local in self._by_pid.values()]

    def kill_all(self) -> None:
        """SIGKILL every live group: the last resort on a second Ctrl-C."""
        for local in self._by_pid.values():
            self.signal(local.handle, signal.SIGKILL)

    def stamp(self) -> list[AttemptHandle]:
        """Read the start time of the processes spawned since the last call (one pass per
        loop iteration, after the spawn batch); one already gone is skipped: its exit is
        on its way."""
        if not self._unstamped:
            return []
        handles, self._unstamped = self._unstamped, []
        stamped = []
        for handle in handles:
            assert handle.pid is not None
            created = procfs.start_time(handle.pid)
            if created is not None:
                handle.create_time = created
                stamped.append(handle)
        return stamped

    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        """Each attempt's process group's summed RSS, from one pass over /proc."""
        by_group = group_rss()
        return [by_group.get(h.pgid) if h.pgid is not None else None for h in handles]


def group_rss() -> dict[int, int]:
    """Process group id -> summed RSS in bytes of its live processes, from /proc/*/stat."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = procfs.stat_fields(int(name))
        try:
            pgrp, rss = int(fields[2]), int(fields[21]) * procfs.PAGE  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            continue
        out[pgrp] = out.get(pgrp, 0) + rss
    return out


_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


def _spawn_reason(exc: OSError, argv0: str) -> str:
    if exc.errno == errno.ENOENT:
        return f"executable not found: {argv0!r}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {argv0!r}"
    if exc.errno == errno.ENOEXEC:
        return f"not an executable format: {argv0!r} (a script needs a #! line)"
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
        return f"out of resources: {exc.strerror}"
    if exc.errno == errno.E2BIG:
        return (
            f"argument list or environment too long for {argv0!r} (one value may hold "
            "128 KiB at most; the shard's record travels in ORCH_SHARD)"
        )
    return f"{exc.strerror or exc} ({argv0!r})"
