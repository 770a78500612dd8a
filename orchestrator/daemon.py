"""Detached masters, resume, and cleaning up after a master that died.

``orch run -d`` validates and creates the run in the foreground (so a user
mistake is still a one-line error), then starts ``python -m
orchestrator.daemon RUN_DIR``: a new session with no controlling terminal,
stdin from /dev/null, stdout and stderr to ``master.log`` in the run
directory. The CLI waits until the master has recorded itself as running,
then prints the run id as its last line.

``orch resume RUN`` first makes sure nothing of the run still lives: every
recorded attempt whose pid still exists with the same start time (so a
reused pid is never touched), and every process in a recorded process group
that carries the run's ``ORCH_RUN_ID``, gets SIGTERM, a grace period, then
SIGKILL. Only then does a master start on the same run directory; it
restarts the unfinished shards from their checkpoints and leaves done
shards done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from orchestrator import environ, procfs
from orchestrator.config import TaskConfig
from orchestrator.errors import RET_FAILED, RET_OK, RET_USAGE, OrchError
from orchestrator.report import master_alive
from orchestrator.runs import MASTER_LOG, MASTER_PID, STATE_DB, lock_run
from orchestrator.sources import ShardList
from orchestrator.store import Store

START_TIMEOUT_S = 15.0
#: How long resume waits for SIGKILLed leftovers to be gone (a process in D state can linger).
KILL_WAIT_S = 5.0


class RunIsLive(OrchError):
    """Raised when resuming a run whose master is still alive."""


class NothingToResume(OrchError):
    """Raised when resuming a run whose every shard is done (or failed, without
    --retry-failed): the run is over, and ``exit_code`` is its own (0 when done)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def detach(
    run_id: str, run_dir: str, lock_fd: int, *, resume: bool = False, retry_failed: bool = False
) -> int:
    """Start the master in the background, handing it the run lock; print the run id."""
    argv = [sys.executable, "-m", "orchestrator.daemon", run_dir, "--lock-fd", str(lock_fd)]
    if retry_failed:
        argv.append("--retry-failed")
    try:
        with open(os.path.join(run_dir, MASTER_LOG), "ab", opener=_private) as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                pass_fds=(lock_fd,),
                cwd="/",
            )
    finally:
        os.close(lock_fd)  # the master holds it now
    deadline = time.monotonic() + START_TIMEOUT_S
    store = Store.open(os.path.join(run_dir, STATE_DB), readonly=True)
    try:
        while time.monotonic() < deadline:
            run = store.run()
            if run.get("master_pid") == proc.pid and run.get("state") == "running":
                break
            if run.get("master_pid") == proc.pid and run.get("state") != "running":
                break  # it already finished (a very short run)
            if proc.poll() is not None:
                raise OrchError(f"the master exited at start ({_last_line(run_dir)})")
            time.sleep(0.02)
        else:
            raise OrchError(
                f"the master did not start within {START_TIMEOUT_S:g}s "
                f"(see {os.path.join(run_dir, MASTER_LOG)})"
            )
    finally:
        store.close()
    print(
        f"orch: {'resumed' if resume else 'started'} run in the background "
        f"(master pid {proc.pid}); 'orch status {run_id}', 'orch logs {run_id} -f'"
    )
    print(run_id)
    return RET_OK


def _private(path: str, flags: int) -> int:
    """``open(..., opener=_private)``: a new file readable by its owner only (0600)."""
    return os.open(path, flags, 0o600)


def _last_line(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, MASTER_LOG), encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "no output"
    except OSError:
        return "no log"


def load_run(run_dir: str) -> tuple[str, TaskConfig, ShardList, Store]:
    """Open a run for its master: the task snapshot and the shard list from the database."""
    store = Store.open(os.path.join(run_dir, STATE_DB))
    run = store.run()
    task = TaskConfig.from_json(run["task_json"])
    rows = store.shards()
    shards = ShardList.from_records(
        [(r["id"], r["record"] or {}, r["line"] or 0) for r in rows],
        source=run.get("source") or "",
        format="stored",
    )
    return run["id"], task, shards, store


def leftovers(store: Store, run_id: str) -> list[int]:
    """Pids of processes that still belong to the run (verified, never a reused pid)."""
    pids: set[int] = set()
    pgids: set[int] = set()
    for row in store.shards():
        for att in store.attempts(row["idx"]):
            if att.get("ended_at") is not None or not att.get("pid"):
                continue
            pid = att["pid"]
            if att.get("create_time") is not None and procfs.start_time(pid) == float(
                att["create_time"]
            ):
                pids.add(pid)
            if att.get("pgid"):
                pgids.add(att["pgid"])
    if pgids:
        for pid in procfs.with_env({f"ORCH_RUN_ID={run_id}".encode()}):
            fields = procfs.stat_fields(pid)
            if fields and int(fields[2]) in pgids:
                pids.add(pid)
    pids.discard(os.getpid())
    return sorted(pids)


def kill_leftovers(store: Store, run_id: str, grace_s: float) -> int:
    """SIGTERM, grace, SIGKILL every leftover process of the run; return how many there were."""
    pids = [p for p in leftovers(store, run_id) if procfs.exists(p)]
    procfs.signal_pids(pids, *procfs.TERM_THEN_CONT)
    deadline = time.monotonic() + grace_s
    live = list(pids)
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [p for p in live if procfs.exists(p)]
    procfs.signal_pids(live, signal.SIGKILL)
    # Gone means gone: no new attempt may overlap one that is still exiting.
    deadline = time.monotonic() + KILL_WAIT_S
    while live and time.monotonic() < deadline:
        time.sleep(0.01)
        live = [p for p in live if procfs.exists(p)]
    return len(pids)


def prepare_resume(
    run_dir: str, retry_failed: bool = False
) -> tuple[str, TaskConfig, ShardList, Store, int]:
    """Take the run lock, stop leftovers, close lost attempts; the run is ready for a master."""
    lock_fd = lock_run(run_dir)
    run_id, task, shards, store = load_run(run_dir)
    run = store.run()
    if lock_fd is None or (run.get("state") == "running" and master_alive(run)):
        store.close()
        if lock_fd is not None:
            os.close(lock_fd)
        pid = run.get("master_pid")
        raise RunIsLive(
            f"run {run_id} is live (master pid {pid} holds it); "
            "'orch stop' it first or 'orch wait' for it"
        )
    left = [
        row
        for row in store.shards()
        if row["state"] != "done" and (row["state"] != "failed" or retry_failed)
    ]
    if not left:
        failed = len(store.shards(states=["failed"]))
        if run.get("state") == "running":
            # Its master died after the last shard ended but before it wrote the end.
            store.set_run(
                state="failed" if failed else "done",
                exit_code=RET_FAILED if failed else RET_OK,
                ended_at=time.time(),
            )
            store.commit()
        store.close()
        os.close(lock_fd)
        why = (
            f"its {failed} failed shard{'s' if failed != 1 else ''} stay failed "
            "('orch resume --retry-failed' restarts them)"
            if failed
            else "every shard is done"
        )
        raise NothingToResume(
            f"run {run_id} has nothing to resume: {why}", RET_FAILED if failed else RET_OK
        )
    killed = kill_leftovers(store, run_id, task.stop_timeout_s)
    if killed:
        print(
            f"orch: stopped {killed} leftover process{'es' if killed != 1 else ''} of run {run_id}"
        )
    # Attempts the dead master never saw end are closed now, with what we know.
    for row in store.shards(states=["running", "stopping"]):
        for att in store.attempts(row["idx"]):
            if att.get("ended_at") is None:
                store.attempt_ended(
                    row["idx"],
                    att["attempt"],
                    ended_at=time.time(),
                    exit_code=None,
                    signal=None,
                    reason="lost with the master",
                )
    store.commit()
    return run_id, task, shards, store, lock_fd


def main(argv: list[str]) -> int:
    """``python -m orchestrator.daemon RUN_DIR``: the detached master."""
    from orchestrator.master import Master
    from orchestrator.ui import PlainView

    retry_failed = "--retry-failed" in argv
    argv = [a for a in argv if a != "--retry-failed"]
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--lock-fd"):
        print("usage: python -m orchestrator.daemon RUN_DIR [--lock-fd FD]", file=sys.stderr)
        return RET_USAGE
    run_dir = argv[0]
    lock_fd = int(argv[2]) if len(argv) == 3 else lock_run(run_dir)
    if lock_fd is None:
        print(f"orch: {run_dir} is held by another master", file=sys.stderr)
        return RET_USAGE
    os.set_inheritable(lock_fd, False)  # attempts must never hold the run lock
    run_id, task, shards, store = load_run(run_dir)
    task, base_env = environ.for_master(run_dir, task)
    with open(os.path.join(run_dir, MASTER_PID), "w", opener=_private) as f:
        f.write(f"{os.getpid()}\n")
    master = Master(
        run_id=run_id,
        run_dir=run_dir,
        task=task,
        shards=shards,
        store=store,
        view=PlainView(tick_s=10.0),
        retry_failed=retry_failed,
        base_env=base_env,
    )
    code = master.run()
    store.close()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
