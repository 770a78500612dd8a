"""Descendants that leave their attempt's process group (``setsid`` daemons) are stopped too.

killpg cannot reach them; the master (a subreaper) finds them among its own
children by the attempt's ORCH_* environment, and the guardian finds them by
ORCH_RUN_ID when the master is killed outright.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
from helpers.world import Env, cmdline, poll_for, run_pids

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="no setsid(1)")


def wait_run_id(env: Env, timeout: float = 10.0) -> str:
    runs = env.home / "runs"
    assert poll_for(lambda: runs.exists() and any(runs.iterdir()), timeout), "no run directory"
    return env.run_id()


def _sleeps(run_id: str, env: Env) -> list[int]:
    return [p for p in run_pids(run_id, env.home) if cmdline(p)[:1] == ["sleep"]]


def test_exit_0_stops_a_daemon_the_shard_left_behind(env: Env) -> None:
    script = env.script("daemonize.sh", "setsid sleep 1000 &\necho spawned\n")
    proc = env.orch("run", "--split", "1", "--stop-timeout", "0.5", "--", "sh", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_pids(env.run_id(), env.home) == []


def test_master_sigkill_stops_a_daemon_that_left_the_group(env: Env) -> None:
    script = env.script("escape.sh", "setsid sleep 1000 &\nsleep 1000\n")
    proc = env.start("run", "--split", "1", "--stop-timeout", "0.5", "--", "sh", script)
    run_id = wait_run_id(env)
    assert poll_for(lambda: len(_sleeps(run_id, env)) == 2, 10), run_pids(run_id, env.home)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
    assert poll_for(lambda: run_pids(run_id, env.home) == [], 10), run_pids(run_id, env.home)
