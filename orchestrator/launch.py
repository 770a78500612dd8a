"""Putting a master on an opened run: in the foreground, detached, or resumed.

Every way a run gets a master goes through here: ``orch run``, ``orch
resume``, ``orchestrator.run(...)`` and the detached master
(``python -m orchestrator.daemon``). ``supervise`` is the one place a
``Master`` is built.

``orch run -d`` validates and creates the run in the foreground (so a user
mistake is still a one-line error), then starts ``python -m
orchestrator.daemon RUN_DIR``: a new session with no controlling terminal,
stdin from /dev/null, stdout and stderr to ``master.log`` in the run
directory, holding the run lock handed to it. The CLI waits until the
master has recorded itself as running, then prints the run id as its last
line.

``orch resume RUN`` first makes sure nothing of the run still lives: every
recorded attempt whose pid still exists with the same start time (so a
reused pid is never touched), and every process in a recorded process group
that carries the run's ``ORCH_RUN_ID``, gets SIGTERM, a grace period, then
SIGKILL. Only then does a master start on the same run directory; it
restarts the unfinished shards from their checkpoints and leaves done
shards done.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator import environ, procfs
from orchestrator.errors import RET_FAILED, RET_OK, OrchError, UsageError
from orchestrator.runs import (
    OpenedRun,
    RunDir,
    home_dir,
    live_runs,
    master_alive,
    names_lock,
    private,
)
from orchestrator.store import Store

if TYPE_CHECKING:
    from orchestrator.guardian import Guardian
    from orchestrator.ports import EventSink, View

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


def supervise(
    run: OpenedRun, view: View, *, retry_failed: bool = False, guardian: Guardian | None = None
) -> int:
    """Build the run's master and run it to the end; return the run's exit code.

    The only place a ``Master`` is constructed (the foreground run and the
    detached master both come here). ``guardian``: the one ``early_guardian`` started.
    """
    if guardian is None:
        guardian = early_guardian(run)
    # The master's stack (ZeroMQ, the backend, the views) is loaded only by the process that
    # supervises: `orch run -d` and `orch resume -d` hand the run over without it.
    from orchestrator.assemble import build_master

    master = build_master(
        run_id=run.id,
        run_dir=run.dir.path,
        task=run.task,
        shards=run.shards,
        store=run.store,
        view=view,
        retry_failed=retry_failed,
        base_env=run.environ,
        sinks=_notify_sinks(run),
        guardian=guardian,
    )
    return master.run()


def early_guardian(run: OpenedRun) -> Guardian | None:
    """Start a local run's guardian now, before the master's stack is imported.

    The guardian is a Python program of its own: its interpreter starts on the other core
    while this one imports, instead of competing with the first spawns for a core
    (docs/performance.md). A Ray run has none (its host actors guard their attempts).
    """
    if run.task.backend == "ray":
        return None
    from orchestrator.guardian import Guardian

    return Guardian(run.task.stop_timeout_s, run.id)


def _notify_sinks(run: OpenedRun) -> list[EventSink]:
    """The run's notifier, when ``orch run`` recorded channels for it (notify.json)."""
    if not os.path.exists(os.path.join(run.dir.path, "notify.json")):
        return []
    from orchestrator.notify.sink import NotifySink

    return [NotifySink.for_run(run.store, run.dir.path)]


def run_command(head: str | None, command: tuple[str, ...], opts: dict[str, Any]) -> int:
    """``orch run``: check everything, create the run, start its master; the exit code."""
    # orch run's preparation (orch.toml, templates, executables): not needed to resume.
    from orchestrator.start import notify_channels, prepare

    task, shards = prepare(head, command, opts)
    channels = notify_channels(head, opts)
    home = home_dir(opts.get("home"))
    name = opts.get("name") or task.name
    # One live run per task (a task of orch.toml) or per --name; ad-hoc runs are unchecked.
    checked = not opts.get("allow_concurrent") and (
        opts.get("name") is not None or (head is not None and ":" not in head)
    )
    with names_lock(home):
        if checked:
            refuse_live(home, name, task.concurrency)
        run = OpenedRun.create(task, shards, home=home, name=name)
    if channels:
        from orchestrator.notify.deliver import write_channels

        write_channels(run.dir.path, channels, os.environ)
    return start(run, detach=bool(opts.get("detach")), verbose=bool(opts.get("verbose")))


def refuse_live(home: str, name: str, concurrency: int) -> None:
    """One live run per task (``concurrency``: at most N): exit 2 naming the live run."""
    live = live_runs(home, name)
    if len(live) >= concurrency:
        most = "a live run"
        if concurrency > 1:
            most = f"{len(live)} live runs (concurrency {concurrency})"
        raise UsageError(
            f"{name!r} already has {most}: {live[0].id}; 'orch stop {live[0].id}' it, "
            "or give --allow-concurrent"
        )


def start(
    run: OpenedRun,
    *,
    detach: bool,
    verbose: bool = False,
    resume: bool = False,
    retry_failed: bool = False,
) -> int:
    """Supervise ``run`` here (live view, then the summary) or hand it to a detached master."""
    if detach:
        run.store.close()
        return _detach(run.dir, run.hand_over_lock(), resume=resume, retry_failed=retry_failed)
    try:
        guardian = early_guardian(run)
        from orchestrator.views.live import default_view  # loads the master (see supervise)

        code = supervise(run, default_view(verbose), retry_failed=retry_failed, guardian=guardian)
        if run.store.failing is None:  # else the database holds no end: the line said it all
            from orchestrator.views.summary import print_summary  # at the end: not in start-up

            print_summary(run.store, run.dir)
        return code
    finally:
        run.close()


# ----------------------------------------------------------------------------- detached


def _detach(run_dir: RunDir, lock_fd: int, *, resume: bool, retry_failed: bool) -> int:
    """Start the master in the background, handing it the run lock; print the run id.

    Returns once the master has recorded itself and bound its control socket (which it
    does after starting its first attempts), so the caller can steer it at once.
    """
    import subprocess  # only orch run -d and orch resume -d start a process this way

    argv = [sys.executable, "-m", "orchestrator.daemon", run_dir.path, "--lock-fd", str(lock_fd)]
    if retry_failed:
        argv.append("--retry-failed")
    try:
        with open(run_dir.master_log, "ab", opener=private) as log:
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
    store = Store.open(run_dir.state_db, readonly=True)
    try:
        while time.monotonic() < deadline:
            run = store.run()
            if run.get("master_pid") == proc.pid and (
                run.get("state") != "running" or _bound(str(run.get("control") or ""))
            ):
                break  # running, or already finished (a very short run)
            if proc.poll() is not None:
                raise OrchError(f"the master exited at start ({_last_line(run_dir)})")
            time.sleep(0.02)  # allowed-sleep: polling the database for the master's record
        else:
            raise OrchError(
                f"the master did not start within {START_TIMEOUT_S:g}s (see {run_dir.master_log})"
            )
    finally:
        store.close()
    print(
        f"orch: {'resumed' if resume else 'started'} run in the background "
        f"(master pid {proc.pid}); 'orch status {run_dir.id}', 'orch logs {run_dir.id} -f'"
    )
    print(run_dir.id)
    return RET_OK


def _bound(endpoint: str) -> bool:
    """Whether the ipc socket at ``endpoint`` exists (any other endpoint counts as bound)."""
    return not endpoint.startswith("ipc://") or os.path.exists(endpoint[len("ipc://") :])


def _last_line(run_dir: RunDir) -> str:
    try:
        with open(run_dir.master_log, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "no output"
    except OSError:
        return "no log"


# ----------------------------------------------------------------------------- resume


def reopen(
    run_dir: RunDir, *, retry_failed: bool = False, env: Mapping[str, str] | None = None
) -> OpenedRun:
    """Take the run lock, stop leftovers, close lost attempts: the run is ready for a master.

    Raises ``NothingToResume`` when no shard is left to run (recording the end a dead
    master could not). ``env`` (``orch resume --env``) is checked against the shards,
    kept with the run's starting environment, and applied.
    """
    lock_fd = run_dir.lock()
    run = OpenedRun.load(run_dir, lock_fd=lock_fd)
    row = run.store.run()
    if lock_fd is None or (row.get("state") == "running" and master_alive(row)):
        run.close()
        raise RunIsLive(
            f"run {run.id} is live (master pid {row.get('master_pid')} holds it); "
            "'orch stop' it first or 'orch wait' for it"
        )
    try:
        _check_left(run, row, retry_failed)
        if env:
            _add_env(run, env)
    except BaseException:
        run.close()
        raise
    killed = kill_leftovers(run.store, run.id, run.task.stop_timeout_s)
    if killed:
        print(
            f"orch: stopped {killed} leftover process{'es' if killed != 1 else ''} of run {run.id}"
        )
    # Attempts the dead master never saw end are closed now, with what we know.
    for shard in run.store.shards(states=["running", "stopping"]):
        for att in run.store.attempts(shard["idx"]):
            if att.get("ended_at") is None:
                run.store.attempt_ended(
                    shard["idx"],
                    att["attempt"],
                    ended_at=time.time(),
                    exit_code=None,
                    signal=None,
                    reason="lost with the master",
                )
    run.store.commit()
    return run


def _check_left(run: OpenedRun, row: Mapping[str, Any], retry_failed: bool) -> None:
    left = [
        shard
        for shard in run.store.shards()
        if shard["state"] != "done" and (shard["state"] != "failed" or retry_failed)
    ]
    if left:
        return
    failed = len(run.store.shards(states=["failed"]))
    if row.get("state") == "running":
        # Its master died after the last shard ended but before it wrote the end.
        run.store.set_run(
            state="failed" if failed else "done",
            exit_code=RET_FAILED if failed else RET_OK,
            ended_at=time.time(),
        )
        run.store.commit()
    why = (
        f"its {failed} failed shard{'s' if failed != 1 else ''} stay failed "
        "('orch resume --retry-failed' restarts them)"
        if failed
        else "every shard is done"
    )
    raise NothingToResume(
        f"run {run.id} has nothing to resume: {why}", RET_FAILED if failed else RET_OK
    )


def _add_env(run: OpenedRun, env: Mapping[str, str]) -> None:
    """``orch resume --env``: every shard must render with it before it is kept."""
    from orchestrator.template import check_fields, compile_command

    task = dataclasses.replace(run.task, env={**run.task.env, **env})
    check_fields(compile_command(task), run.shards)
    environ.add_env(run.dir.path, env)
    run.task = task


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
            if procfs.process_group(pid) in pgids:
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
        time.sleep(0.05)  # allowed-sleep: polling for leftovers to exit within the grace
        live = [p for p in live if procfs.exists(p)]
    procfs.signal_pids(live, signal.SIGKILL)
    # Gone means gone: no new attempt may overlap one that is still exiting.
    deadline = time.monotonic() + KILL_WAIT_S
    while live and time.monotonic() < deadline:
        time.sleep(0.01)  # allowed-sleep: polling for SIGKILLed leftovers to be gone
        live = [p for p in live if procfs.exists(p)]
    return len(pids)
