"""Operating jobs with real processes: one live run per name, the failure policy
(final exit codes, max_failed), restarting every shard (rolling) and scaling down."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.control import Run, detached_env, start_detached
from helpers.world import Env, poll_for


@pytest.fixture
def denv(tmp_path: Path) -> Iterator[Env]:
    yield from detached_env(tmp_path)


#: Runs until the test stops it; prints its attempt so restarts are visible in the logs.
FOREVER = ["sh", "-c", "echo started $ORCH_SHARD_ID attempt $ORCH_ATTEMPT; exec sleep 60"]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _task(env: Env, extra: str = "") -> None:
    env.write(
        "orch.toml",
        f"""
[tasks.svc]
command = ["sh", "-c", "exec sleep 60"]
split = 1
stop_timeout = "2s"
{extra}
""",
    )


# --- one live run per name ----------------------------------------------------------------


def test_a_second_run_of_a_live_task_is_refused_naming_the_live_run(denv: Env) -> None:
    _task(denv)
    first = start_detached(denv, "svc")
    proc = denv.orch("run", "svc")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert first in line and "--allow-concurrent" in line
    assert len(list((denv.home / "runs").iterdir())) == 1  # nothing was created
    by_name = denv.orch("run", "--name", "other", "-d", "--split", "1", "--", "true")
    assert by_name.returncode == 0  # another name is another task
    second = start_detached(denv, "svc", "--allow-concurrent")
    assert second != first and Run(denv, second).row()["name"] == "svc"
    # --name NAME is checked the same way
    named = start_detached(denv, "--name", "svc2", "--split", "1", "--", "sleep", "60")
    again = denv.orch("run", "--name", "svc2", "--split", "1", "--", "true")
    assert again.returncode == 2 and named in one_line_error(again)


def test_ad_hoc_runs_without_a_name_are_never_refused(denv: Env) -> None:
    first = start_detached(denv, "--split", "1", "--", "sleep", "60")
    second = start_detached(denv, "--split", "1", "--", "sleep", "60")
    assert first != second
    assert Run(denv, first).row()["state"] == Run(denv, second).row()["state"] == "running"


def test_concurrency_n_allows_n_live_runs(denv: Env) -> None:
    _task(denv, "concurrency = 2")
    start_detached(denv, "svc")
    start_detached(denv, "svc")
    third = denv.orch("run", "svc")
    assert third.returncode == 2 and "2 live runs (concurrency 2)" in one_line_error(third)


def test_a_finished_run_does_not_block_and_status_name_prefers_the_live_run(denv: Env) -> None:
    _task(denv)
    live = start_detached(denv, "svc")
    done = denv.orch("run", "svc", "--allow-concurrent", "--", "true")
    assert done.returncode == 0, done.stderr
    newest = [p.name for p in sorted((denv.home / "runs").iterdir()) if p.name != live]
    assert len(newest) == 1
    assert denv.status("svc")["id"] == live  # the live run first, though not the newest
    assert denv.orch("stop", live).returncode == 0
    assert poll_for(lambda: Run(denv, live).row()["state"] == "stopped", timeout=15)
    assert denv.status("svc")["id"] == newest[0]  # none live: the newest
    after = denv.orch("run", "svc", "-d")  # nothing live any more: allowed
    assert after.returncode == 0, after.stderr


# --- the failure policy -------------------------------------------------------------------


def test_final_exit_code_fails_at_once_and_max_failed_stops_the_rest(denv: Env) -> None:
    script = denv.script("job.sh", 'if [ "$1" -lt 2 ]; then exit 44; fi\nexec sleep 60\n')
    proc = denv.orch(
        "run",
        "--split", "5",
        "-j", "3",
        "--final-exit-codes", "4,44",
        "--max-failed", "1",
        "--stop-timeout", "2s",
        "--", "sh", script, "{index}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    detail = denv.status(denv.run_id())
    assert detail["state"] == "failed"
    shards = {s["id"]: s for s in detail["shards"]}
    assert {i: shards[i]["state"] for i in shards} == {
        "0": "failed",
        "1": "failed",
        "2": "stopped",
        "3": "stopped",
        "4": "stopped",
    }
    assert shards["0"]["attempts"] == 1 and shards["1"]["attempts"] == 1  # no restart
    assert "final exit code" in (shards["0"]["reason"] or "")
    assert shards["4"]["attempts"] == 0  # pending ones are never started
    assert "max_failed" in (shards["4"]["reason"] or "")


def test_final_exit_codes_from_orch_toml_and_a_bad_value_is_exit_2(denv: Env) -> None:
    denv.write(
        "orch.toml",
        """
[tasks.t]
command = ["sh", "-c", "exit 4"]
split = 1
final_exit_codes = [4]
""",
    )
    proc = denv.orch("run", "t")
    assert proc.returncode == 1
    assert denv.status(denv.run_id())["shards"][0]["attempts"] == 1
    bad = denv.orch("run", "t", "--final-exit-codes", "4,x")
    assert bad.returncode == 2 and "--final-exit-codes" in one_line_error(bad)
    denv.write("orch.toml", '[tasks.t]\ncommand = ["true"]\nsplit = 1\nmax_failed = -1\n')
    bad = denv.orch("run", "t")
    assert bad.returncode == 2 and "max_failed" in one_line_error(bad)
    denv.write("orch.toml", '[tasks.t]\ncommand = ["true"]\nsplit = 1\nautostart = "yes"\n')
    bad = denv.orch("run", "t")
    assert bad.returncode == 2 and "autostart" in one_line_error(bad)


# --- restart every shard, rolling; scale down ---------------------------------------------


def _attempt_starts(run: Run) -> dict[tuple[str, int], float]:
    with sqlite3.connect(f"file:{run.db}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT s.id, a.attempt, a.started_at FROM attempts a"
            " JOIN shards s ON s.idx = a.shard_idx"
        ).fetchall()
    return {(sid, att): started for sid, att, started in rows}


def test_restart_every_shard_and_rolling_one_at_a_time(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "3", "--stop-timeout", "5s", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 3, timeout=15)
    proc = denv.orch("restart", run.id)
    assert proc.returncode == 0 and "restarting 3 running shards" in proc.stdout
    assert poll_for(
        lambda: run.attempts() == {"0": 2, "1": 2, "2": 2} and run.count("running") == 3,
        timeout=15,
    )
    proc = denv.orch("restart", run.id, "--rolling", "1")
    assert proc.returncode == 0 and "1 at a time" in proc.stdout
    assert poll_for(
        lambda: run.attempts() == {"0": 3, "1": 3, "2": 3} and run.count("running") == 3,
        timeout=20,
    )
    starts = _attempt_starts(run)
    # Each next one restarted only once the previous one was running again.
    assert starts[("0", 3)] <= starts[("1", 3)] <= starts[("2", 3)]
    ends = {}
    with sqlite3.connect(f"file:{run.db}?mode=ro", uri=True) as db:
        for sid, ended in db.execute(
            "SELECT s.id, a.ended_at FROM attempts a JOIN shards s ON s.idx = a.shard_idx"
            " WHERE a.attempt = 2"
        ):
            ends[sid] = ended
    assert ends["1"] >= starts[("0", 3)] and ends["2"] >= starts[("1", 3)]
    bad = denv.orch("restart", run.id, "--shard", "0", "--rolling", "1")
    assert bad.returncode == 2 and "--rolling" in one_line_error(bad)


def test_scale_down_stops_the_surplus_back_to_pending_and_resume_keeps_the_jobs(
    denv: Env,
) -> None:
    run = Run(denv, start_detached(denv, "--split", "3", "--stop-timeout", "5s", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 3, timeout=15)
    proc = denv.orch("scale", run.id, "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.count("running") == 1 and run.count("pending") == 2, timeout=15)
    assert run.count("failed") == 0
    reasons = {s["reason"] for s in run.shards().values() if s["state"] == "pending"}
    assert reasons == {"scaled down: waiting for a slot"}
    assert run.row()["jobs"] == 1
    text = denv.orch("status", run.id).stdout
    assert "jobs 1" in text.splitlines()[0]
    assert denv.orch("stop", run.id).returncode == 0
    assert poll_for(lambda: run.row()["state"] == "stopped", timeout=15)
    resumed = denv.orch("resume", run.id, "-d")
    assert resumed.returncode == 0, resumed.stderr
    assert poll_for(lambda: run.count("running") == 1, timeout=15)
    assert run.row()["jobs"] == 1 and run.count("pending") == 2  # the concurrency was kept
    assert denv.status(run.id)["jobs"] == 1
