"""Issue 10 end to end, through the real ``orch`` CLI: what a PHP batch user trips over.

Each test names the item of issue 10 it holds to. Tests that need ``php``
skip cleanly when it is not installed; each PHP test has a ``sh`` twin that
holds the same contract everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.control import Run, detached_env, start_detached
from helpers.world import ORCH, PYTHON, Env, orch_env, poll_for

PHP = shutil.which("php")
needs_php = pytest.mark.skipif(PHP is None, reason="php is not installed")

DEADLINE_S = 30.0


@pytest.fixture
def denv(tmp_path: Path) -> Iterator[Env]:
    """An Env whose teardown also kills detached masters (not our children)."""
    yield from detached_env(tmp_path)


def _detail(env: Env, run: str | None = None) -> dict:
    return env.status(run or env.run_id())


# --- item 1: a slow query is not a hang --------------------------------------------------

SLOW_SH = 'echo \'##orch {"done":0,"total":3}\'; sleep 11; echo \'##orch {"done":3}\'\n'
SLOW_PHP = """<?php
echo '##orch ' . json_encode(['done' => 0, 'total' => 3]) . "\\n";
sleep(11);  // the slow query: longer than the 10 s heartbeat timeout
echo '##orch ' . json_encode(['done' => 3]) . "\\n";
"""


@pytest.mark.parametrize("lang", ["sh", pytest.param("php", marks=needs_php)])
def test_stdout_shard_blocking_past_heartbeat_timeout_is_not_killed(env: Env, lang: str) -> None:
    script = env.script(f"slow.{lang}", SLOW_SH if lang == "sh" else SLOW_PHP)
    proc = env.orch("run", "--split", "1", "--", lang, script, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (shard,) = _detail(env)["shards"]
    assert (shard["state"], shard["attempts"], shard["done"]) == ("done", 1, 3), shard
    assert "hung" not in proc.stdout + proc.stderr


def test_explicit_heartbeat_timeout_applies_to_stdout_shards(env: Env) -> None:
    script = env.script("slow.sh", 'echo \'##orch {"done":0}\'; sleep 30\n')
    proc = env.orch("run", "--split", "1", "--heartbeat-interval", "0.2",
                    "--heartbeat-timeout", "1s", "--max-restarts", "0", "--stop-timeout", "1",
                    "--", "sh", script, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (shard,) = _detail(env)["shards"]
    assert shard["state"] == "failed" and "hung" in shard["reason"], shard


@pytest.mark.parametrize(
    ("flag", "value"), [("--heartbeat-timeout", "0"), ("--stall-timeout", "0s")]
)
def test_zero_timeout_is_refused_with_a_hint(env: Env, flag: str, value: str) -> None:
    proc = env.orch("run", "--split", "1", flag, value, "--", "true")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("orch: ") and flag in line and "'none'" in line, line
    assert not (env.home / "runs").exists() or not list((env.home / "runs").iterdir())


def test_none_switches_the_heartbeat_timeout_off(env: Env) -> None:
    env.write("orch.toml", '[tasks.t]\ncommand = ["true"]\nsplit = 1\nstall_timeout = "none"\n')
    proc = env.orch("run", "t", "--heartbeat-timeout", "none")
    assert proc.returncode == 0, proc.stderr
    task = _detail(env)["task"]
    assert task["heartbeat_timeout_s"] is None and task["stall_timeout_s"] is None, task


# --- item 2: JSON in sh -c ----------------------------------------------------------------


def test_json_in_sh_c_is_passed_literally(env: Env) -> None:
    proc = env.orch("run", "--split", "1", "--", "sh", "-c",
                    'echo "##orch {\\"total\\": 10, \\"done\\": {index}}"; echo ${HOME:+set}')
    assert proc.returncode == 0, proc.stderr
    (shard,) = _detail(env)["shards"]
    assert (shard["total"], shard["done"]) == (10, 0), shard
    logs = env.orch("logs", env.run_id(), "--shard", "0")
    assert "set" in logs.stdout, logs


def test_idx_suggests_index(env: Env) -> None:
    proc = env.orch("run", "--split", "2", "--", "echo", "{idx}")
    assert proc.returncode == 2
    assert "did you mean 'index'?" in proc.stderr, proc.stderr


# --- item 4: orch wait --timeout ----------------------------------------------------------


def test_wait_timeout_exits_124_and_takes_durations(denv: Env) -> None:
    gate = denv.cwd / "go"
    script = denv.script("gate.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    started = denv.orch("run", "-d", "--split", "1", "--", "sh", script)
    assert started.returncode == 0, started.stderr
    run = started.stdout.split()[-1]
    t0 = time.monotonic()
    waited = denv.orch("wait", run, "--timeout", "300ms")
    assert waited.returncode == 124, waited
    assert time.monotonic() - t0 < 20
    (line,) = waited.stderr.splitlines()
    assert line.startswith("orch: ") and "still running" in line, line
    bad = denv.orch("wait", run, "--timeout", "soon")
    assert bad.returncode == 2 and "--timeout" in bad.stderr, bad
    gate.touch()
    done = denv.orch("wait", run, "--timeout", "1m")
    assert done.returncode == 0, done


# --- item 3: malformed ##orch lines are said, not swallowed -------------------------------

BAD_LINES = r"""
echo '##orch {"done": "5"}'
echo '##orch not json'
echo '##orch {"speed": 3}'
echo '##orch [1, 2]'
echo "##orch {\"message\": \"$(printf 'x%.0s' $(seq 300))\"\"}"
echo '##orch {"done": -1}'
echo '##orch {"done": 1, "advance": 1}'
echo '##orch {"total": true}'
echo '##orch {"done": 2}'
"""


def test_bad_protocol_lines_are_logged_on_stderr_and_in_verbose_output(env: Env) -> None:
    script = env.script("bad.sh", BAD_LINES)
    proc = env.orch("run", "-v", "--split", "1", "--", "sh", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = env.run_id()
    (shard,) = _detail(env)["shards"]
    assert shard["done"] == 2  # the good line still counts
    err_log = env.orch("logs", run, "--shard", "0", "--stderr").stdout.splitlines()
    notes = [ln[25:] for ln in err_log if ln[25:].startswith("orch: ")]
    assert len(notes) == 6, err_log
    assert notes[0] == (
        "orch: bad ##orch line: 'done' must be a non-negative integer, not str: "
        "'##orch {\"done\": \"5\"}'"
    )
    assert "not JSON" in notes[1] and "'speed'" in notes[2] and "not a JSON object" in notes[3]
    assert notes[4].endswith("...'") and len(notes[4]) < 220, notes[4]
    assert notes[5] == "orch: 3 more bad ##orch lines not shown"
    output = (proc.stdout + proc.stderr).splitlines()
    shown = [ln for ln in output if "bad ##orch line:" in ln]
    assert len(shown) == 5 and all(ln.startswith("orch: ") for ln in shown), shown
    assert "orch: shard 0: 3 more bad ##orch lines not shown" in output
    assert _detail(env)["counters"]["bad_stdout_lines"] == 8


# --- item 6: resume keeps the run's starting environment ----------------------------------

SEEN = """\
echo "$ORCH_ATTEMPT ${INHERITED:-unset} ${EXTRA:-unset}" >> "$1"
if [ "$ORCH_ATTEMPT" = 1 ]; then
    while :; do sleep 0.05; done  # the first attempt runs until the run is stopped
fi
"""


def _start_then_stop(env: Env, seen: str) -> str:
    script = env.script("seen.sh", SEEN)
    started = env.orch("run", "-d", "--split", "1", "--stop-timeout", "2", "--",
                       "sh", script, seen, env={"INHERITED": "yes", "SECRET_TOKEN": "sekrit-42"})
    assert started.returncode == 0, started.stderr
    run = started.stdout.split()[-1]
    assert poll_for(lambda: (env.cwd / seen).exists(), DEADLINE_S)
    assert env.orch("stop", run).returncode == 0
    assert env.orch("wait", run).returncode == 1
    return run


def test_resume_uses_the_environment_the_run_started_with(denv: Env) -> None:
    run = _start_then_stop(denv, "seen.txt")
    resumed = denv.orch("resume", run)  # from a shell without INHERITED
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (denv.cwd / "seen.txt").read_text().splitlines() == ["1 yes unset", "2 yes unset"]
    recorded = denv.home / "runs" / run / "environ.json"
    assert recorded.stat().st_mode & 0o777 == 0o600
    for args in (["status", run, "--json"], ["status", run], ["status", "--json"]):
        shown = denv.orch(*args)
        assert shown.returncode == 0 and "sekrit-42" not in shown.stdout + shown.stderr, args


def test_resume_env_overrides(denv: Env) -> None:
    run = _start_then_stop(denv, "seen.txt")
    resumed = denv.orch("resume", run, "--env", "INHERITED=override", "--env", "EXTRA=x{index}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (denv.cwd / "seen.txt").read_text().splitlines()[-1] == "2 override x0"
    bad = denv.orch("resume", run, "--env", "NOEQUALS")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr, bad


# --- item 7: resume of a done run ---------------------------------------------------------


def test_resume_of_a_done_run_says_nothing_to_resume(env: Env) -> None:
    assert env.orch("run", "--split", "2", "--", "true").returncode == 0
    run = env.run_id()
    resumed = env.orch("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to resume" in resumed.stdout, resumed.stdout
    assert all(s["attempts"] == 1 for s in _detail(env)["shards"])
    assert "master pid" not in resumed.stdout


# --- item 8: a full disk stops the run cleanly, and resume finishes it ---------------------

FILLER = """\
import os, sys, shards
acked = open(sys.argv[1] + "." + os.environ["ORCH_SHARD_ID"], "a")
cp = shards.last_checkpoint()
start = cp["i"] + 1 if cp else 0
acked.write(f"start {os.environ['ORCH_ATTEMPT']} {start}\\n"); acked.flush()
for i in range(start, 400):
    sys.stdout.write(("line %d " % i) + "x" * 4000 + "\\n")
    sys.stdout.flush()
    try:
        shards.checkpoint({"i": i, "pad": "p" * (1000 + 97 * (i % 50))})
    except shards.CheckpointError:
        continue  # not saved: not acknowledged, so not recorded below
    acked.write(f"acked {i}\\n"); acked.flush()
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs for orch's home (root only); unmounted at teardown."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_stops_the_run_cleanly_and_resume_finishes_it(
    denv: Env, small_disk: Path
) -> None:
    home = small_disk / "home"
    script = denv.script("filler.py", FILLER)
    acked = str(denv.cwd / "acked")
    proc = denv.orch("run", "--home", str(home), "--split", "2", "--stop-timeout", "2",
                     "--", PYTHON, script, acked, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "Error" not in out, out
    (run,) = [p.name for p in (home / "runs").iterdir()]
    db = home / "runs" / run / "state.db"
    lines = [ln for ln in out.splitlines() if str(db) in ln]
    assert len(lines) == 1 and "No space left on device" in lines[0], out
    assert lines[0].startswith("orch: ") and f"orch resume {run}" in lines[0]
    last_acked = {}
    for shard in ("0", "1"):
        marks = Path(f"{acked}.{shard}").read_text().split()
        acks = [int(marks[k + 1]) for k in range(len(marks)) if marks[k] == "acked"]
        last_acked[shard] = max(acks, default=-1)
    # Free space, then resume: every acknowledged checkpoint is still there.
    grown = subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)],
                           capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = denv.orch("resume", "--home", str(home), run, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for shard in ("0", "1"):
        starts = [ln.split() for ln in Path(f"{acked}.{shard}").read_text().splitlines()
                  if ln.startswith("start ")]
        if len(starts) > 1:  # the shard was unfinished: it went on from its last ack, or later
            assert int(starts[-1][2]) >= last_acked[shard] + 1, (shard, starts, last_acked)
    detail = json.loads(denv.orch("status", "--home", str(home), run, "--json").stdout)
    assert [s["state"] for s in detail["shards"]] == ["done", "done"], detail


GATED = 'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'


def test_status_by_shared_name_prefers_the_live_run(denv: Env) -> None:
    gate = denv.cwd / "go"
    script = denv.script("gate.sh", GATED.format(gate=gate))
    live = start_detached(denv, "--name", "nightly", "--split", "1", "--", "sh", script)
    # A second live run of one name needs --allow-concurrent (one live run per name).
    second = denv.orch(
        "run", "--name", "nightly", "--allow-concurrent", "--split", "1", "--", "true"
    )
    assert second.returncode == 0, second.stderr
    assert _detail(denv, "nightly")["id"] == live  # the live one, not the newer done one
    gate.touch()
    assert denv.orch("wait", live).returncode == 0
    # The newer run is the other one (ids started in one second sort by a random suffix).
    (newest,) = [p.name for p in (denv.home / "runs").iterdir() if p.name != live]
    assert _detail(denv, "nightly")["id"] == newest  # none live: the newest


def test_lost_run_shows_its_shards_lost_without_rate_or_eta(denv: Env) -> None:
    script = denv.script("count.sh", 'i=0; while :; do i=$((i+1)); '
                         'echo "##orch {\\"done\\": $i, \\"total\\": 100000}"; sleep 0.05; done\n')
    run = Run(denv, start_detached(denv, "--split", "3", "--", "sh", script))
    assert poll_for(lambda: all((s["done"] or 0) > 2 for s in _detail(denv, run.id)["shards"]),
                    DEADLINE_S)
    os.kill(run.master_pid(), signal.SIGKILL)
    detail = poll_for(lambda: (d := _detail(denv, run.id))["state"] == "lost" and d, DEADLINE_S)
    assert detail, _detail(denv, run.id)
    assert detail["counts"] == {"lost": 3}, detail["counts"]
    assert (detail["rate"], detail["eta_s"], detail["master_pid"]) == (None, None, None)
    for s in detail["shards"]:
        assert (s["state"], s["rate"], s["eta_s"], s["pid"]) == ("lost", None, None, None), s
        assert s["heartbeat_age_s"] is None
    text = denv.orch("status", run.id).stdout
    assert "running" not in text and "ETA" not in text and "3 lost" in text, text
    listing = denv.orch("status").stdout
    assert "3 lost" in listing and "running" not in listing, listing


def test_failed_attempt_says_why_in_the_live_output(env: Env) -> None:
    proc = env.orch("run", "--split", "2", "--max-restarts", "0", "--", "sh", "-c",
                    'if [ {index} = 0 ]; then echo "PHP Fatal error:  Uncaught Exception: '
                    'boom" >&2; else echo "PHP Fatal error:  on stdout"; fi; '
                    'echo "  thrown in x.php on line 3" >&2; exit 255')
    assert proc.returncode == 1
    out = proc.stdout
    assert "shard 0 attempt 1: exit 255: PHP Fatal error: Uncaught Exception: boom" in out, out
    assert "shard 1 attempt 1: exit 255: thrown in x.php on line 3" in out, out


def test_failed_attempt_without_stderr_shows_its_stdout(env: Env) -> None:
    proc = env.orch("run", "--split", "1", "--max-restarts", "0", "--", "sh", "-c",
                    'echo "PHP Fatal error:  Uncaught Error: on stdout"; exit 255')
    assert proc.returncode == 1
    assert "attempt 1: exit 255: PHP Fatal error: Uncaught Error: on stdout" in proc.stdout
    assert "| PHP Fatal error:  Uncaught Error: on stdout" in proc.stdout  # end summary


def test_status_shows_a_running_shards_message_and_last_restart(denv: Env) -> None:
    gate = denv.cwd / "go"
    script = denv.script("msg.sh", f"""\
echo '##orch {{"message": "fetching page 8"}}'
if [ "$ORCH_ATTEMPT" = 1 ]; then exit 3; fi
{GATED.format(gate=gate)}""")
    run = start_detached(denv, "--split", "1", "--backoff-initial", "0.05", "--", "sh", script)
    seen = poll_for(lambda: (s := _detail(denv, run)["shards"][0])["attempts"] == 2
                    and s["message"] and s["state"] == "running" and s, DEADLINE_S)
    assert seen, _detail(denv, run)
    text = denv.orch("status", run).stdout
    row = [ln for ln in text.splitlines() if ln.startswith("0 ")]
    assert row and "fetching page 8" in row[0] and "last restart: exit 3" in row[0], text
    gate.touch()


def test_inline_run_ignores_a_broken_orch_toml(env: Env) -> None:
    env.write("orch.toml", "[tasks.crawl\ncommand = \n")
    assert env.orch("run", "--split", "1", "--", "true").returncode == 0
    named = env.orch("run", "crawl")
    assert named.returncode == 2 and "orch.toml" in named.stderr  # named: still read
    given = env.orch("run", "--config", "orch.toml", "--split", "1", "--", "true")
    assert given.returncode == 2 and "orch.toml" in given.stderr


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_home_of_another_user_is_one_line_not_a_traceback(env: Env) -> None:
    assert env.orch("run", "--split", "1", "--", "true").returncode == 0
    run = env.run_id()
    subprocess.run(["chown", "-R", "65534:65534", str(env.home)], check=True)
    env.home.chmod(0o700)
    for args in (["status"], ["status", run], ["status", run, "--json"], ["stop", run],
                 ["logs", run], ["wait", run], ["resume", run]):
        # root without its capabilities: the file permissions apply as to any user
        proc = subprocess.run([SETPRIV, "--bounding-set=-all", "--inh-caps=-all", ORCH, *args],
                              env=orch_env(env.home), cwd=env.cwd, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        (line,) = proc.stderr.splitlines()
        assert line.startswith("orch: ") and "Permission denied" in line, line
        assert str(env.home) in line and "uid 65534" in line, line


# --- item 7: docs and code agree ---------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_status_help_points_to_docs_that_exist(env: Env) -> None:
    helptext = env.orch("status", "--help").stdout
    for ref in re.findall(r"docs/[\w.-]+\.md", helptext):
        assert (DOCS.parent / ref).is_file(), ref


def test_zero_counters_are_left_out_as_documented(env: Env) -> None:
    assert env.orch("run", "--split", "1", "--", "true").returncode == 0
    assert _detail(env)["counters"] == {}
    assert "a counter that is 0 is left out" in (DOCS / "cli.md").read_text()


def test_a_null_checkpoint_renders_as_documented(env: Env) -> None:
    script = env.script("cp.sh", """\
if [ "$ORCH_ATTEMPT" = 1 ]; then echo '##orch {"checkpoint": null}'; exit 1; fi
printf '%s' "$1" > got.txt
""")
    proc = env.orch("run", "--split", "1", "--backoff-initial", "0.05", "--",
                    "sh", script, "{checkpoint}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (env.cwd / "got.txt").read_text() == "null"
    assert "`null` for a checkpoint of `null`" in (DOCS / "config.md").read_text()


def test_no_distributed_backend_is_promised(env: Env) -> None:
    """Nothing is promised for later: the Ray backend's transport is documented as it is."""
    text = (DOCS / "protocol.md").read_text()
    assert "specified with the distributed backend" not in text
    assert "is planned" not in text
    assert "`tcp://` with CURVE" in text and "ORCH_CURVE_SERVER" in text


def test_oversized_frame_is_not_counted_as_documented(denv: Env) -> None:
    """protocol.md: ZeroMQ closes the connection of a frame over 1 MiB before orch sees
    it, so it is not counted; a small bad frame is. The master lives on."""
    from helpers.progress import ask, dealer, run_row

    gate = denv.cwd / "go"
    script = denv.script("gate.sh", GATED.format(gate=gate))
    run = start_detached(denv, "--split", "1", "--", "sh", script)
    endpoint = run_row(denv, run)["endpoint"]
    with dealer(endpoint) as big:
        big.send(b"{" + b" " * (2 << 20) + b"}")
    with dealer(endpoint) as small:
        small.send(b"not json")
        assert poll_for(lambda: ask(denv, run, "status")["dropped"]["garbage"] >= 1, DEADLINE_S)
    assert ask(denv, run, "status")["dropped"]["garbage"] == 1
    text = (DOCS / "protocol.md").read_text()
    assert "**not counted**" in text
    gate.touch()
    assert denv.orch("wait", run).returncode == 0


# --- item 5: orch logs shows both streams -------------------------------------------------

STREAMS = """\
echo 'first on stdout'
echo '##orch {"done": 1}'
sleep 0.05  # allowed-sleep: distinct timestamps for the two streams
echo 'PHP Fatal error:  on stderr' >&2
sleep 0.05  # allowed-sleep: as above
echo 'last on stdout'
"""


def test_logs_interleave_both_streams_in_time_order(env: Env) -> None:
    script = env.script("streams.sh", STREAMS)
    assert env.orch("run", "--split", "1", "--", "sh", script).returncode == 0
    run = env.run_id()

    def body(*args: str) -> list[str]:
        proc = env.orch("logs", run, "--shard", "0", *args)
        assert proc.returncode == 0, proc.stderr
        return [ln[25:] for ln in proc.stdout.splitlines() if not ln[25:].startswith("## orch:")]

    assert body() == ["first on stdout", "[stderr] PHP Fatal error:  on stderr", "last on stdout"]
    assert body("--stdout") == ["first on stdout", "last on stdout"]
    assert body("--stderr") == ["PHP Fatal error:  on stderr"]
    assert body("--protocol") == [
        "first on stdout", '##orch {"done": 1}', "[stderr] PHP Fatal error:  on stderr",
        "last on stdout",
    ]
    markers = [ln for ln in env.orch("logs", run, "--shard", "0").stdout.splitlines()
               if "## orch: attempt 1" in ln]
    assert len(markers) == 2, markers  # start and end, once each (not once per stream)


def test_resume_records_the_end_a_dead_master_could_not(denv: Env) -> None:
    """Every shard done, the master killed before it wrote the run's end: resume has
    nothing to run, and records the run as done (not lost for ever)."""
    import sqlite3

    assert denv.orch("run", "--split", "2", "--", "true").returncode == 0
    run = denv.run_id()
    db = sqlite3.connect(denv.home / "runs" / run / "state.db")
    with db:  # what the database holds when the master died at that instant
        db.execute("UPDATE run SET state = 'running', exit_code = NULL, ended_at = NULL")
    db.close()
    assert _detail(denv, run)["state"] == "lost"
    resumed = denv.orch("resume", run, "-d")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[-1] == run
    detail = _detail(denv, run)
    assert (detail["state"], detail["exit_code"]) == ("done", 0), detail
