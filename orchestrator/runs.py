"""Orch's home, run ids, and the opened run.

Layout::

    $ORCH_HOME (or $XDG_STATE_HOME/orch, or ~/.local/state/orch)
      runs/<run-id>/            mode 0700
        state.db                SQLite (WAL): run, shards, attempts, checkpoints
        task.json               the task the run started with (0600)
        environ.json            the environment it started with, for resume (0600, never shown)
        task.pkl                the pickled callable of an ``orchestrator.run`` run
        logs/<index>-<id>.out   per-shard stdout, timestamped, rotated
        logs/<index>-<id>.err   per-shard stderr
        master.log              the master's own log (detached runs)
        master.pid
        master.lock             flocked by whoever supervises the run
        hb.sock, control.sock   ZeroMQ ipc endpoints while the master lives

A ``RunDir`` names every one of those paths (readers need nothing more); an
``OpenedRun`` is a run a master can supervise: its directory, task, shard
list, writable store and lock. Both are made here and nowhere else:
``OpenedRun.create`` for a new run, ``OpenedRun.load`` for the detached
master and ``orch resume``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator import environ, procfs
from orchestrator.errors import ConfigError, OrchError, RunNotFound
from orchestrator.logs import log_stem
from orchestrator.store import RunRow, Store

if TYPE_CHECKING:
    from orchestrator.config import TaskConfig
    from orchestrator.sources import ShardList

STATE_DB = "state.db"
LOCK = "master.lock"
TASK_JSON = "task.json"
TASK_PICKLE = "task.pkl"
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


def private(path: str, flags: int) -> int:
    """``open(..., opener=private)``: a new file readable by its owner only (0600)."""
    return os.open(path, flags, 0o600)


@dataclass(frozen=True, slots=True)
class RunDir:
    """A run directory and every path inside it; opens nothing by itself."""

    path: str

    @property
    def id(self) -> str:
        return os.path.basename(self.path)

    @property
    def state_db(self) -> str:
        return os.path.join(self.path, STATE_DB)

    @property
    def task_json(self) -> str:
        return os.path.join(self.path, TASK_JSON)

    @property
    def task_pickle(self) -> str:
        return os.path.join(self.path, TASK_PICKLE)

    @property
    def logs(self) -> str:
        return os.path.join(self.path, LOGS)

    @property
    def master_log(self) -> str:
        return os.path.join(self.path, MASTER_LOG)

    @property
    def master_pid(self) -> str:
        return os.path.join(self.path, MASTER_PID)

    @property
    def lock_file(self) -> str:
        return os.path.join(self.path, LOCK)

    def log_path(self, index: int, shard_id: str, ext: str) -> str:
        """A shard's log: ``ext`` is ``.out`` (stdout) or ``.err`` (stderr)."""
        return os.path.join(self.path, LOGS, log_stem(index, shard_id) + ext)

    def ipc(self, name: str) -> str:
        """A socket path for ``name`` (``hb.sock``): see ``ipc_path``."""
        return ipc_path(self.path, self.id, name)

    def read(self) -> Store:
        """The run's database, read-only (never blocks the master)."""
        return Store.open(self.state_db, readonly=True)

    def lock(self) -> int | None:
        """Take the run's master lock; return its fd, or None when a live master holds it.

        An exclusive ``flock`` on ``master.lock``: held by whoever supervises the
        run (the foreground ``orch run``, or the detached master it hands the fd
        to), released by the kernel when that process dies, however it dies. So
        two ``orch resume`` of one run can never both start a master.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.lock_file, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


@dataclass(slots=True)
class OpenedRun:
    """A run ready for a master: its directory, task, shard list, store and (maybe) lock."""

    dir: RunDir
    task: TaskConfig
    shards: ShardList
    store: Store
    #: The flocked ``master.lock``; None once handed to a detached master or released.
    lock_fd: int | None = None
    #: The environment the run started with (``orchestrator.environ``): attempts get it,
    #: whoever starts the master and from wherever. None: this process's (an older run).
    environ: dict[str, str] | None = None

    @property
    def id(self) -> str:
        return self.dir.id

    @classmethod
    def create(
        cls, task: TaskConfig, shards: ShardList, *, home: str | None, name: str | None
    ) -> OpenedRun:
        """Make the run directory, the task snapshot and the database; take the lock."""
        root = home_dir(home)
        run_id = new_run_id()
        try:
            os.makedirs(runs_root(root), mode=0o700, exist_ok=True)
            path = os.path.join(runs_root(root), run_id)
            os.mkdir(path, 0o700)
            os.mkdir(os.path.join(path, LOGS), 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create a run in {root}: {exc.strerror}") from None
        run_dir = RunDir(path)
        _write_task_json(run_dir, task, shards.source)
        row = RunRow(
            id=run_id,
            name=name or task.name,
            task_json=task.to_json(),
            source=shards.source,
            shard_count=len(shards),
            started_at=time.time(),
            jobs=task.jobs,
        )
        store = Store.create(run_dir.state_db, row, ((s.id, s.record, s.line) for s in shards))
        started_env = dict(os.environ)
        environ.record(run_dir.path, started_env)  # for orch resume, from any shell
        lock_fd = run_dir.lock()
        assert lock_fd is not None  # a new run directory: nobody else can hold it
        return cls(run_dir, task, shards, store, lock_fd, started_env)

    @classmethod
    def load(cls, run_dir: RunDir, *, lock_fd: int | None = None) -> OpenedRun:
        """Open an existing run for its master: the task snapshot and shards from the database."""
        # Only a master loads a run: `orch status` imports this module and stays lean without.
        from orchestrator.config import TaskConfig
        from orchestrator.sources import ShardList

        store = Store.open(run_dir.state_db)
        run = store.run()
        task, started_env = environ.for_master(run_dir.path, TaskConfig.from_json(run["task_json"]))
        shards = ShardList.from_records(
            [(r["id"], r["record"] or {}, r["line"] or 0) for r in store.shards()],
            source=run.get("source") or "",
            format="stored",
        )
        return cls(run_dir, task, shards, store, lock_fd, started_env)

    def set_task(self, task: TaskConfig) -> None:
        """Replace the task of a run not yet started: snapshot file and database alike."""
        self.task = task
        self.store.set_run(task_json=task.to_json())
        _write_task_json(self.dir, task, self.shards.source)
        self.store.commit()

    def hand_over_lock(self) -> int:
        """The lock fd, for a detached master to inherit; this object holds it no more."""
        fd = self.lock_fd
        assert fd is not None
        self.lock_fd = None
        return fd

    def close(self) -> None:
        """Close the store and release the lock (if still held here)."""
        self.store.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _write_task_json(run_dir: RunDir, task: TaskConfig, source: str) -> None:
    # 0600 like everything in the run directory: the task may hold secrets (--env TOKEN=...).
    payload: dict[str, Any] = {"task": task.to_json(), "source": source}
    fd = os.open(run_dir.task_json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2))


# ----------------------------------------------------------------------------- finding runs


def master_alive(run: Mapping[str, Any]) -> bool:
    """Whether the master recorded in ``run`` still lives (pid plus its start time).

    A zombie is dead: a killed detached master whose parent (init in a
    container whose PID 1 does not reap) never collects it must still show
    as lost and be resumable.
    """
    pid = run.get("master_pid")
    if not pid:
        return False
    started = procfs.live_start_time(pid)
    if started is None:
        return False
    recorded = run.get("master_create_time")
    return recorded is None or started == float(recorded)


def run_state(run: Mapping[str, Any]) -> str:
    """The stored state, or ``lost`` when it says running but its master is gone."""
    state = str(run.get("state") or "running")
    if state == "running" and not master_alive(run):
        return "lost"
    return state


def list_runs(home: str) -> list[RunDir]:
    """Run directories, newest first (run ids sort by start time)."""
    root = runs_root(home)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    dirs = [RunDir(os.path.join(root, n)) for n in names]
    return sorted((d for d in dirs if os.path.exists(d.state_db)), key=_started_key, reverse=True)


def _started_key(run_dir: RunDir) -> tuple[str, int, str]:
    """Start order: the id's second, then (runs started within one second, whose
    random tails do not sort) when task.json was written, once, at creation."""
    name = run_dir.id
    try:
        written = os.stat(run_dir.task_json).st_mtime_ns
    except OSError:
        written = 0
    return name.rsplit("-", 1)[0], written, name


def resolve_run(
    home: str,
    key: str,
    names: Mapping[str, str] | None = None,
    live: Collection[str] = (),
) -> RunDir:
    """The run for ``key``: a run id, a unique id prefix, or a ``--name``.

    ``names`` maps run directory path -> name (read from the databases); a
    name given to several runs means the live one (``live``: paths of live
    runs), else the newest of them.
    """
    exact = RunDir(os.path.join(runs_root(home), key))
    if key and "/" not in key and os.path.exists(exact.state_db):
        return exact
    dirs = list_runs(home)
    if names:
        named = [d for d in dirs if names.get(d.path) == key]  # newest first
        for d in named:
            if d.path in live:
                return d
        if named:
            return named[0]
    prefixed = [d for d in dirs if d.id.startswith(key)] if key else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        few = ", ".join(d.id for d in prefixed[:5])
        raise RunNotFound(f"run {key!r} is ambiguous in {home} (matches {few})")
    raise RunNotFound(f"no run {key!r} in {home} ('orch status' lists runs)")


def find_run(key: str, home: str | None) -> RunDir:
    """A run id, a unique id prefix, or a name in the home given by ``--home``; names
    are read only when needed. Several runs with one name: the live one, else the newest."""
    root = home_dir(home)
    try:
        return resolve_run(root, key)
    except RunNotFound:
        names, live = _names(root)
        return resolve_run(root, key, names, live)


def _names(home: str) -> tuple[dict[str, str], set[str]]:
    """Every run's name by path, and the paths of the live runs."""
    out: dict[str, str] = {}
    live: set[str] = set()
    for d in list_runs(home):
        try:
            store = d.read()
        except OrchError:
            continue
        try:
            row = store.run()
        finally:
            store.close()
        out[d.path] = row.get("name") or ""
        if run_is_live(row, d):
            live.add(d.path)
    return out, live


def run_is_live(run: Mapping[str, Any], run_dir: RunDir) -> bool:
    """Running with its master alive, or pending while its creator holds the run lock.

    A pending run whose lock nobody holds is a creation that died before its
    master started: not live. (The probe takes the lock for an instant.)
    """
    state = str(run.get("state") or "running")
    if state == "running":
        return master_alive(run)
    if state != "pending":
        return False
    fd = run_dir.lock()
    if fd is None:
        return True
    os.close(fd)
    return False


def live_runs(home: str, name: str) -> list[RunDir]:
    """The live runs named ``name`` (``--name``, or the task's name), newest first."""
    names, live = _names(home)
    return [d for d in list_runs(home) if d.path in live and names.get(d.path) == name]


@contextlib.contextmanager
def names_lock(home: str) -> Iterator[None]:
    """Held while ``orch run`` checks for live runs of a name and creates its own, so two
    starting together cannot both find none (``names.lock`` in orch's home, flock)."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(home, "names.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ipc_path(run_dir: str, run_id: str, name: str) -> str:
    """A socket path inside the run directory, or a short private one when that is too long."""
    path = os.path.join(run_dir, name)
    if len(path) <= MAX_IPC_PATH:
        return path
    import tempfile  # rarely needed: not at every start

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
