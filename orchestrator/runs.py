"""Orch's home, run ids and run directories.

Layout::

    $ORCH_HOME (or $XDG_STATE_HOME/orch, or ~/.local/state/orch)
      runs/<run-id>/            mode 0700
        state.db                SQLite (WAL): run, shards, attempts, checkpoints
        task.json               the task the run started with
        logs/<index>-<id>.out   per-shard stdout, timestamped, rotated
        logs/<index>-<id>.err   per-shard stderr
        master.log              the master's own log (detached runs)
        master.pid
        hb.sock, control.sock   ZeroMQ ipc endpoints while the master lives
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Mapping

from orchestrator.errors import OrchError, RunNotFound

STATE_DB = "state.db"
LOCK = "master.lock"
TASK_JSON = "task.json"
LOGS = "logs"
MASTER_LOG = "master.log"
MASTER_PID = "master.pid"
#: sockaddr_un holds 108 bytes; keep ipc paths safely under it.
MAX_IPC_PATH = 100


def home_dir(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``--home`` > ``$ORCH_HOME`` > ``$XDG_STATE_HOME/orch`` > ``~/.local/state/orch``."""
    env = os.environ if environ is None else environ
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    if env.get("ORCH_HOME"):
        return os.path.abspath(os.path.expanduser(env["ORCH_HOME"]))
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(os.path.abspath(state), "orch")


def runs_root(home: str) -> str:
    return os.path.join(home, "runs")


def new_run_id(now: float | None = None) -> str:
    """``20261126-191501-3fa9``: sorts by start time, unique with the random tail."""
    t = time.localtime(time.time() if now is None else now)
    return time.strftime("%Y%m%d-%H%M%S", t) + "-" + os.urandom(2).hex()


def create_run_dir(home: str, run_id: str) -> str:
    root = runs_root(home)
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, run_id)
    os.mkdir(path, 0o700)
    os.mkdir(os.path.join(path, LOGS), 0o700)
    return path


def list_run_dirs(home: str) -> list[str]:
    """Run directories, newest first (run ids sort by start time)."""
    root = runs_root(home)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    dirs = [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, STATE_DB))]
    return sorted(dirs, key=_started_key, reverse=True)


def _started_key(run_dir: str) -> tuple[str, int, str]:
    """Start order: the id's second, then (runs started within one second, whose
    random tails do not sort) when task.json was written, once, at creation."""
    name = os.path.basename(run_dir)
    try:
        written = os.stat(os.path.join(run_dir, TASK_JSON)).st_mtime_ns
    except OSError:
        written = 0
    return name.rsplit("-", 1)[0], written, name


def resolve_run(home: str, key: str, names: Mapping[str, str] | None = None) -> str:
    """The run directory for ``key``: a run id, a unique id prefix, or a ``--name``.

    ``names`` maps run directory -> name (read by the caller from the
    databases); a name given to several runs means the newest of them.
    """
    root = runs_root(home)
    exact = os.path.join(root, key)
    if key and "/" not in key and os.path.exists(os.path.join(exact, STATE_DB)):
        return exact
    dirs = list_run_dirs(home)
    if names:
        for d in dirs:  # newest first
            if names.get(d) == key:
                return d
    prefixed = [d for d in dirs if os.path.basename(d).startswith(key)] if key else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        few = ", ".join(os.path.basename(d) for d in prefixed[:5])
        raise RunNotFound(f"run {key!r} is ambiguous in {home} (matches {few})")
    raise RunNotFound(f"no run {key!r} in {home} ('orch status' lists runs)")


def lock_run(run_dir: str) -> int | None:
    """Take the run's master lock; return its fd, or None when a live master holds it.

    An exclusive ``flock`` on ``master.lock``: held by whoever supervises the
    run (the foreground ``orch run``, or the detached master it hands the fd
    to), released by the kernel when that process dies, however it dies. So
    two ``orch resume`` of one run can never both start a master.
    """
    import fcntl

    fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def ipc_path(run_dir: str, run_id: str, name: str) -> str:
    """A socket path inside the run directory, or a short private one when that is too long."""
    path = os.path.join(run_dir, name)
    if len(path) <= MAX_IPC_PATH:
        return path
    base = os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OrchError(f"{base}: cannot create a directory for sockets ({exc.strerror})") from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        # In a shared /tmp anyone may create this name first: whoever owns the directory (or
        # a symlink's target) could replace our sockets and speak for the master. Never use it.
        raise OrchError(
            f"{base}: not a directory of your own; remove it, or set TMPDIR to a private directory"
        )
    os.chmod(base, 0o700)
    return os.path.join(base, f"{run_id}-{name}")
