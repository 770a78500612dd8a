"""``orch run``, ``orch status`` and ``orch logs`` end to end: the real CLI, real processes.

Each test is one of issue 2's "tests that must exist". Processes are waited
for with ``poll_for`` (a condition and a deadline), never with a fixed sleep;
every run lives in the test's own home and cwd (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.world import ORCH, PYTHON, Env, by_id, cmdline, orch_env, poll_for, run_pids

ISO_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z ")
STARTED = re.compile(r"## orch: attempt (\d+) started, pid (\d+)$")
ENDED = re.compile(r"## orch: attempt (\d+) ended: (.+) after [\d.]+s$")

#: Writes what the shard received (argv after the script, ORCH_* and T_* environment)
#: to out/<ORCH_SHARD_INDEX>.json next to the script.
RECORD = """\
import json, os, sys
from pathlib import Path
out = Path(__file__).parent / "out"
out.mkdir(exist_ok=True)
env = {k: v for k, v in os.environ.items() if k.startswith(("ORCH_", "T_"))}
name = out / (os.environ["ORCH_SHARD_INDEX"] + ".json")
name.write_text(json.dumps({"argv": sys.argv[1:], "env": env}), encoding="utf-8")
"""


def recorded(env: Env) -> dict[int, dict[str, Any]]:
    out = env.cwd / "out"
    return {int(p.stem): json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*.json")}


def wait_run_id(env: Env, timeout: float = 10.0) -> str:
    runs = env.home / "runs"
    assert poll_for(lambda: runs.exists() and any(runs.iterdir()), timeout), "no run directory"
    return env.run_id()


def assert_clean_exit(proc: Any) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


# --- many shards ----------------------------------------------------------------------


def test_100_shards_from_a_csv_all_done(env: Env) -> None:
    env.write("s.csv", "id,n\n" + "".join(f"s{i},{i}\n" for i in range(100)))
    proc = env.orch("run", "--shards", "s.csv", "--", "test", "{n}", "-ge", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_clean_exit(proc)
    detail = env.status(env.run_id())
    assert (detail["state"], detail["exit_code"], detail["shard_count"]) == ("done", 0, 100)
    assert detail["counts"] == {"done": 100}
    assert [s["id"] for s in detail["shards"]] == [f"s{i}" for i in range(100)]
    assert [s["index"] for s in detail["shards"]] == list(range(100))
    for s in detail["shards"]:
        assert (s["state"], s["attempts"], s["exit_code"], s["pid"]) == ("done", 1, 0, None), s
    assert f"run {detail['id']} done" in proc.stdout


# --- templating -----------------------------------------------------------------------

NASTY = [
    "x; echo INJECTED > marker",
    "$(touch pwned)",
    "`touch pwned2`",
    "it's \"quoted\" 'twice'",
    "  two  spaces  ",
    "line one\nline two",
    "tab\there",
    "ünïcødé ✓ 日本語 🚀",
    "{index} {{id}} {nope}",
    "--help",
    "a | cat > piped && touch anded",
    "",
]


def test_argv_injection_arrives_verbatim(env: Env) -> None:
    script = env.script("record.py", RECORD)
    lines = [json.dumps({"id": f"s{i}", "val": v, "n": i}) for i, v in enumerate(NASTY)]
    env.write("s.jsonl", "\n".join(lines) + "\n")
    proc = env.orch(
        "run", "--shards", "s.jsonl", "--env", "T_VAL={val}", "--env", "T_MIX=<{val}>{{x}}",
        "--", PYTHON, script, "{val}", "pre-{val}-post", "{id}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)
    assert sorted(got) == list(range(len(NASTY)))
    for i, value in enumerate(NASTY):
        assert got[i]["argv"] == [value, f"pre-{value}-post", f"s{i}"]
        assert got[i]["env"]["T_VAL"] == value
        assert got[i]["env"]["T_MIX"] == f"<{value}>{{x}}"
        assert json.loads(got[i]["env"]["ORCH_SHARD"]) == {"id": f"s{i}", "val": value, "n": i}
    for marker in ("marker", "pwned", "pwned2", "piped", "anded", "INJECTED"):
        assert not (env.cwd / marker).exists(), marker
        assert not (env.home / marker).exists(), marker


def test_csv_values_with_quotes_and_commas_arrive_verbatim(env: Env) -> None:
    script = env.script("record.py", RECORD)
    env.write("s.csv", 'id,val\na,"x, y; echo INJECTED > marker"\nb,"say ""hi"" $(touch pwned)"\n'
                       'c,"multi\nline"\n')
    proc = env.orch("run", "--shards", "s.csv", "--", PYTHON, script, "{val}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)
    assert [got[i]["argv"] for i in range(3)] == [
        ["x, y; echo INJECTED > marker"], ['say "hi" $(touch pwned)'], ["multi\nline"]]
    assert not (env.cwd / "marker").exists() and not (env.cwd / "pwned").exists()


def test_orch_environment_of_each_attempt(env: Env) -> None:
    script = env.script("record.py", RECORD)
    env.write("m.csv", "merchant_id,name\nm1,Alpha\nm2,Beta Co\nm3,Gamma\n")
    proc = env.orch("run", "--shards", "m.csv", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    got = recorded(env)
    names = ["Alpha", "Beta Co", "Gamma"]
    for i in range(3):
        e = got[i]["env"]
        assert e["ORCH_RUN_ID"] == run_id
        assert e["ORCH_SHARD_ID"] == f"m{i + 1}"  # no id column: the first column
        assert e["ORCH_SHARD_INDEX"] == str(i)
        assert e["ORCH_SHARD_COUNT"] == "3"
        assert e["ORCH_ATTEMPT"] == "1"
        assert json.loads(e["ORCH_SHARD"]) == {"merchant_id": f"m{i + 1}", "name": names[i]}


def test_an_outer_orchs_protocol_environment_does_not_leak_into_attempts(env: Env) -> None:
    """orch started from inside a shard (or a shell with stale ORCH_* exports): its attempts
    must not inherit the outer checkpoint (they would skip work) nor the outer SDK owner
    (their SDK would never connect)."""
    script = env.script("record.py", RECORD)
    stale = {"ORCH_CHECKPOINT": '{"pos": 999}', "ORCH_CHECKPOINT_DONE": "999",
             "ORCH_SDK_PID": "1", "ORCH_RUN_ID": "outer-run", "ORCH_SHARD_ID": "outer",
             "ORCH_ENDPOINT": "ipc:///nonexistent/outer.sock", "ORCH_ATTEMPT": "7",
             "T_KEPT": "user value"}
    proc = env.orch("run", "--split", "1", "--", PYTHON, script, env=stale)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)[0]["env"]
    for name in ("ORCH_CHECKPOINT", "ORCH_CHECKPOINT_DONE", "ORCH_SDK_PID"):
        assert name not in got, (name, got[name])
    assert got["ORCH_RUN_ID"] == env.run_id() and got["ORCH_SHARD_ID"] == "0"
    assert got["ORCH_ATTEMPT"] == "1" and got["ORCH_ENDPOINT"] != stale["ORCH_ENDPOINT"]
    assert got["T_KEPT"] == "user value"
    assert got["ORCH_HOME"] == str(env.home)  # configuration is inherited


@pytest.mark.parametrize(("name", "text", "ids", "record"), [
    ("s.csv", "name,id\nAlpha,x1\nBeta,x2\n", ["x1", "x2"], {"name": "Alpha", "id": "x1"}),
    ("s.jsonl", '{"n": 1, "id": 7}\n{"n": 2, "id": 8}\n', ["7", "8"], {"n": 1, "id": 7}),
    ("s.jsonl", '{"n": "a"}\n{"n": "b"}\n', ["a", "b"], {"n": "a"}),
    ("s.txt", "first line\n\n  second line  \n", ["first line", "second line"],
     {"line": "first line"}),
], ids=["csv-id-column", "jsonl-numeric-id", "jsonl-first-key", "text-lines"])
def test_shard_ids_and_fields_of_each_source(
    env: Env, name: str, text: str, ids: list[str], record: dict[str, Any]
) -> None:
    script = env.script("record.py", RECORD)
    env.write(name, text)
    proc = env.orch("run", "--shards", name, "--", PYTHON, script, "{id}", "{index}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)
    assert [got[i]["argv"] for i in range(len(ids))] == [[s, str(i)] for i, s in enumerate(ids)]
    assert json.loads(got[0]["env"]["ORCH_SHARD"]) == record
    assert [s["id"] for s in env.status(env.run_id())["shards"]] == ids


def test_split_with_index_count_and_literal_braces(env: Env) -> None:
    script = env.script("record.py", RECORD)
    proc = env.orch("run", "--split", "4", "--", PYTHON, script,
                    "--split={count}", "--part={index}", "{id}", "{{index}}", "a{{b}}c}}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)
    assert {i: got[i]["argv"] for i in got} == {
        i: ["--split=4", f"--part={i}", str(i), "{index}", "a{b}c}"] for i in range(4)}
    detail = env.status(env.run_id())
    assert [s["id"] for s in detail["shards"]] == ["0", "1", "2", "3"]


def test_range_with_value(env: Env) -> None:
    script = env.script("record.py", RECORD)
    proc = env.orch("run", "--range", "3..5", "--", PYTHON, script, "{value}", "{index}/{count}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = recorded(env)
    assert {i: got[i]["argv"] for i in got} == {0: ["3", "0/3"], 1: ["4", "1/3"], 2: ["5", "2/3"]}
    assert [got[i]["env"]["ORCH_SHARD_ID"] for i in range(3)] == ["3", "4", "5"]


# --- restarts ---------------------------------------------------------------------------


def test_fail_then_succeed_ends_done_with_two_attempts(env: Env) -> None:
    script = env.script("flaky.py", """\
import os, sys
with open("attempts.txt", "a") as f:
    f.write(os.environ["ORCH_ATTEMPT"] + "\\n")
if os.environ["ORCH_ATTEMPT"] == "1":
    print("first attempt fails", file=sys.stderr)
    sys.exit(1)
""")
    proc = env.orch("run", "--split", "1", "--backoff-initial", "0.05", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shard = env.status(env.run_id())["shards"][0]
    assert (shard["state"], shard["attempts"], shard["exit_code"]) == ("done", 2, 0)
    assert (env.cwd / "attempts.txt").read_text().split() == ["1", "2"]
    log = Path(shard["log_stderr"]).read_text()
    assert [m.group(1, 2) for m in map(ENDED.search, log.splitlines()) if m] == [
        ("1", "exit 1"), ("2", "exit 0")]


def test_attempt_killed_by_a_signal_is_restarted_and_logged(env: Env) -> None:
    script = env.script("die.py", """\
import os, signal
if os.environ["ORCH_ATTEMPT"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
""")
    proc = env.orch("run", "--split", "1", "--backoff-initial", "0.05", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shard = env.status(env.run_id())["shards"][0]
    assert (shard["state"], shard["attempts"]) == ("done", 2)
    log = Path(shard["log_stdout"]).read_text()
    assert [m.group(1, 2) for m in map(ENDED.search, log.splitlines()) if m] == [
        ("1", "signal 9 (SIGKILL)"), ("2", "exit 0")]


def test_new_attempt_starts_only_after_the_old_group_is_gone(env: Env) -> None:
    """Promise 1: attempt 1 leaves a grandchild that ignores SIGTERM and fails; attempt 2
    must not start until the grandchild is gone (SIGTERM, grace, SIGKILL)."""
    script = env.script("leave.sh", """\
if [ "$ORCH_ATTEMPT" = 1 ]; then
    trap '' TERM
    sleep 1000 &
    echo $! > bg.pid
    exit 1
fi
pid=$(cat bg.pid)
if tr '\\0' '\\n' < /proc/$pid/environ 2>/dev/null | grep -qx ORCH_ATTEMPT=1; then
    echo "attempt 1's grandchild $pid is alive" > overlap.txt
fi
""")
    proc = env.orch("run", "--split", "1", "--stop-timeout", "0.3", "--backoff-initial", "0.01",
                    "--", "sh", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (env.cwd / "overlap.txt").exists(), (env.cwd / "overlap.txt").read_text()
    shard = env.status(env.run_id())["shards"][0]
    assert (shard["state"], shard["attempts"]) == ("done", 2)
    assert run_pids(env.run_id(), env.home) == []


def test_always_failing_shard_gives_up_while_siblings_finish(env: Env) -> None:
    script = env.script("job.py", """\
import os, sys
if os.environ["ORCH_SHARD_ID"] == "bad":
    print("about to fail", file=sys.stderr)
    print("boom: the disk is on fire", file=sys.stderr)
    sys.exit(3)
print("fine")
""")
    env.write("s.csv", "id\nok1\nbad\nok2\n")
    proc = env.orch("run", "--shards", "s.csv", "--max-restarts", "2", "--backoff-initial", "0.05",
                    "--backoff-max", "0.1", "--", PYTHON, script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_clean_exit(proc)
    detail = env.status(env.run_id())
    assert (detail["state"], detail["exit_code"]) == ("failed", 1)
    assert detail["counts"] == {"done": 2, "failed": 1}
    shards = by_id(detail)
    for ok in ("ok1", "ok2"):
        assert (shards[ok]["state"], shards[ok]["attempts"]) == ("done", 1)
    bad = shards["bad"]
    assert (bad["state"], bad["attempts"], bad["exit_code"]) == ("failed", 3, 3)
    assert "exit 3" in bad["reason"] and "3 attempts" in bad["reason"]
    assert "boom: the disk is on fire" in (bad["last_error"] or "")
    # the end summary names the shard, its reason, its stderr tail and its log
    summary = proc.stdout[proc.stdout.index(f"run {detail['id']} failed"):]
    assert "bad: " + bad["reason"] in summary
    assert "boom: the disk is on fire" in summary
    assert bad["log_stderr"] in summary
    assert "ok1:" not in summary
    log = Path(bad["log_stderr"]).read_text()
    assert [m.group(1) for m in map(STARTED.search, log.splitlines()) if m] == ["1", "2", "3"]


def test_restart_always_is_never_faster_than_the_backoff(env: Env) -> None:
    initial = 0.2
    t0 = time.monotonic()
    proc = env.start("run", "--split", "1", "--restart", "always",
                     "--backoff-initial", str(initial), "--", "true")
    run_id = wait_run_id(env)

    def allowed(elapsed: float) -> int:
        """Attempts the backoff permits in ``elapsed`` s: 2 (the first restart of a streak
        is immediate) + restarts at 0.2, 0.6, 1.4, 3.0..."""
        n, start, delay = 2, 0.0, initial
        while start + delay <= elapsed:
            start, delay, n = start + delay, delay * 2, n + 1
        return n

    seen = 0
    while time.monotonic() - t0 < 3.0:
        shard = env.status(run_id)["shards"][0]
        elapsed = time.monotonic() - t0
        seen = shard["attempts"]
        assert seen <= allowed(elapsed), (seen, elapsed)
    assert seen >= 3, "restart=always did not restart a shard that exited 0"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 143
    detail = env.status(run_id)
    assert (detail["state"], detail["exit_code"]) == ("stopped", 143)
    assert detail["shards"][0]["state"] == "stopped"
    assert detail["shards"][0]["attempts"] <= allowed(time.monotonic() - t0)


@pytest.mark.parametrize(("prog", "reason"), [
    ("no-such-prog-xyz", "executable not found: 'no-such-prog-xyz'"),
    ("./not-executable.sh", "permission denied: './not-executable.sh'"),
    ("./a-directory", "permission denied: './a-directory'"),
], ids=["not-found", "not-executable", "directory"])
def test_attempt_that_cannot_start_fails_in_plain_words_without_restarts(
    env: Env, prog: str, reason: str
) -> None:
    env.write("not-executable.sh", "echo hi\n")
    (env.cwd / "a-directory").mkdir()
    env.write("s.csv", f"id,prog\ngood,true\nbad,{prog}\n")
    proc = env.orch("run", "--shards", "s.csv", "--max-restarts", "3",
                    "--backoff-initial", "0.05", "--", "{prog}", "arg")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_clean_exit(proc)
    shards = by_id(env.status(env.run_id()))
    assert shards["good"]["state"] == "done"
    bad = shards["bad"]
    assert (bad["state"], bad["attempts"]) == ("failed", 1)
    assert bad["reason"].startswith("cannot start: " + reason), bad["reason"]
    assert f"bad: {bad['reason']}" in proc.stdout
    # the summary points only at logs that exist (an attempt that never started wrote none)
    for path in re.findall(r"log: (\S+)", proc.stdout):
        assert Path(path).exists(), path


# --- concurrency ----------------------------------------------------------------------


def test_jobs_caps_how_many_run_at_once(env: Env) -> None:
    script = env.script("span.py", """\
import os, time
t0 = time.time()
time.sleep(0.4)  # allowed-sleep: the shard's simulated work, so that runs overlap
t1 = time.time()
with open(f"span-{os.environ['ORCH_SHARD_INDEX']}", "w") as f:
    f.write(f"{t0} {t1}")
""")
    proc = env.orch("run", "--split", "6", "--jobs", "2", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    detail = env.status(env.run_id())
    assert detail["counts"] == {"done": 6} and detail["jobs"] == 2
    spans = [tuple(map(float, (env.cwd / f"span-{i}").read_text().split())) for i in range(6)]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    assert peak == 2, spans


def test_a_shard_in_backoff_does_not_hold_a_slot(env: Env) -> None:
    """One shard's failures never slow its siblings: with --jobs 1, a sibling runs during
    the failing shard's backoff instead of waiting for it. (Its first restart is immediate;
    the second failure in a row is the one that backs off.)"""
    script = env.script("spans.py", """\
import os, sys, time
with open("spans.txt", "a") as f:
    f.write(f"{os.environ['ORCH_SHARD_ID']} {os.environ['ORCH_ATTEMPT']} {time.time()}\\n")
if os.environ["ORCH_SHARD_ID"] == "flaky" and int(os.environ["ORCH_ATTEMPT"]) <= 2:
    sys.exit(1)
""")
    env.write("s.csv", "id\nflaky\nsteady\n")
    proc = env.orch("run", "--shards", "s.csv", "--jobs", "1", "--backoff-initial", "1",
                    "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    starts = {(who, int(n)): float(t) for who, n, t in
              (ln.split() for ln in (env.cwd / "spans.txt").read_text().splitlines())}
    assert set(starts) == {("flaky", 1), ("flaky", 2), ("flaky", 3), ("steady", 1)}
    assert starts[("steady", 1)] < starts[("flaky", 3)]
    assert starts[("flaky", 3)] - starts[("flaky", 2)] >= 1.0  # the backoff was kept


# --- stopping ---------------------------------------------------------------------------

STUBBORN_SH = """\
{trap}
sleep 1000 &
sleep 1000
"""


def _sleeps(run_id: str, env: Env) -> list[int]:
    return [p for p in run_pids(run_id, env.home) if cmdline(p)[:1] == ["sleep"]]


@pytest.mark.parametrize(("signum", "code", "trap"), [
    (signal.SIGTERM, 143, ""),
    (signal.SIGINT, 130, ""),
    (signal.SIGTERM, 143, "trap '' TERM"),  # ignores SIGTERM: needs the SIGKILL after the grace
], ids=["sigterm", "sigint", "sigterm-stubborn"])
def test_signal_to_orch_run_leaves_no_process_alive(
    env: Env, signum: int, code: int, trap: str
) -> None:
    script = env.script("svc.sh", STUBBORN_SH.format(trap=trap))
    proc = env.start("run", "--split", "3", "--stop-timeout", "0.5", "--", "sh", script)
    run_id = wait_run_id(env)
    assert poll_for(lambda: len(_sleeps(run_id, env)) == 6, 10), run_pids(run_id, env.home)
    shells = [p for p in run_pids(run_id, env.home) if cmdline(p)[:1] == ["sh"]]
    assert len(shells) == 3
    live = env.status(run_id)
    assert live["state"] == "running" and live["exit_code"] is None
    assert [s["state"] for s in live["shards"]] == ["running"] * 3
    assert sorted(s["pid"] for s in live["shards"]) == sorted(shells)
    proc.send_signal(signum)
    assert proc.wait(timeout=15) == code
    assert run_pids(run_id, env.home) == []  # gone before orch exits, grandchildren too
    detail = env.status(run_id)
    assert (detail["state"], detail["exit_code"]) == ("stopped", code)
    assert [s["state"] for s in detail["shards"]] == ["stopped"] * 3
    assert all(s["pid"] is None for s in detail["shards"])


def test_sigterm_stops_queued_shards_too(env: Env) -> None:
    script = env.script("svc.sh", STUBBORN_SH.format(trap=""))
    proc = env.start("run", "--split", "3", "--jobs", "1", "--", "sh", script)
    run_id = wait_run_id(env)
    assert poll_for(lambda: len(_sleeps(run_id, env)) == 2, 10), run_pids(run_id, env.home)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 143
    assert run_pids(run_id, env.home) == []
    detail = env.status(run_id)
    assert [(s["state"], s["attempts"]) for s in detail["shards"]] == [
        ("stopped", 1), ("stopped", 0), ("stopped", 0)]


def test_second_interrupt_kills_at_once(env: Env) -> None:
    script = env.script("svc.sh", STUBBORN_SH.format(trap="trap '' TERM INT"))
    proc = env.start("run", "--split", "2", "--stop-timeout", "60", "--", "sh", script)
    run_id = wait_run_id(env)
    assert poll_for(lambda: len(_sleeps(run_id, env)) == 4, 10), run_pids(run_id, env.home)
    proc.send_signal(signal.SIGINT)
    assert poll_for(lambda: "stopping every shard" in (env.cwd / "orch.stdout").read_text(), 5)
    assert proc.poll() is None  # the shards ignore SIGTERM: orch waits out the grace...
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130  # ...until a second Ctrl-C, far sooner than 60 s
    assert run_pids(run_id, env.home) == []
    detail = env.status(run_id)
    assert [s["state"] for s in detail["shards"]] == ["stopped", "stopped"]


def test_sigterm_stops_a_grandchild_that_left_the_process_group(env: Env) -> None:
    if shutil.which("setsid") is None:
        pytest.skip("no setsid(1)")
    script = env.script("escape.sh", "setsid sleep 1000 &\nsleep 1000\n")
    proc = env.start("run", "--split", "1", "--stop-timeout", "0.5", "--", "sh", script)
    run_id = wait_run_id(env)
    assert poll_for(lambda: len(_sleeps(run_id, env)) == 2, 10), run_pids(run_id, env.home)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 143
    assert run_pids(run_id, env.home) == []


def test_background_grandchild_is_stopped_before_the_shard_is_done(env: Env) -> None:
    script = env.script("leave.sh", """\
if [ "$ORCH_SHARD_INDEX" = 1 ]; then trap '' TERM; fi
sleep 1000 &
echo $! > "bg-$ORCH_SHARD_INDEX.pid"
echo started background
exit 0
""")
    proc = env.orch("run", "--split", "2", "--stop-timeout", "0.3", "--", "sh", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    assert run_pids(run_id, env.home) == []
    for i in range(2):
        pid = int((env.cwd / f"bg-{i}.pid").read_text())
        assert pid not in run_pids(run_id, env.home)
    detail = env.status(run_id)
    assert [(s["state"], s["exit_code"], s["attempts"]) for s in detail["shards"]] == [
        ("done", 0, 1)] * 2


def test_a_reader_that_goes_away_does_not_abort_the_run(env: Env) -> None:
    """``orch run ... | head -1``: once the reader has gone, printing fails with EPIPE. The
    run must still finish and be recorded (not die mid-way and show up as "lost")."""
    script = env.script("wait.py", """\
import os, sys, time
me = os.environ["ORCH_SHARD_INDEX"]
deadline = time.time() + 20
while not os.path.exists(f"go-{me}") and time.time() < deadline:
    time.sleep(0.02)  # allowed-sleep: deadline-bounded poll
sys.exit(1 if me == "0" else 0)
""")
    proc = subprocess.Popen(
        [ORCH, "run", "--split", "2", "--max-restarts", "0", "--", PYTHON, script],
        cwd=env.cwd, env=orch_env(env.home), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env.procs.append(proc)  # type: ignore[arg-type]
    assert proc.stdout is not None and proc.stderr is not None
    assert b"orch: run " in proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    run_id = env.run_id()
    (env.cwd / "go-0").touch()  # shard 0 fails: orch prints a line to nobody
    assert poll_for(lambda: env.status(run_id)["shards"][0]["state"] == "failed", 10)
    (env.cwd / "go-1").touch()
    assert proc.wait(timeout=15) == 1
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()
    detail = env.status(run_id)
    assert (detail["state"], detail["exit_code"]) == ("failed", 1)
    assert [s["state"] for s in detail["shards"]] == ["failed", "done"]


def test_a_reader_of_orch_logs_that_leaves_early_is_not_an_error(env: Env) -> None:
    """``orch logs RUN | head -1``: the reader leaving is not a failure of orch: exit 0,
    nothing on stderr (the output is larger than a pipe holds, so the write does fail)."""
    lines = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done"
    assert env.orch("run", "--split", "3", "--", "sh", "-c", lines).returncode == 0
    proc = subprocess.Popen(
        [ORCH, "logs", env.run_id()], cwd=env.cwd, env=orch_env(env.home),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env.procs.append(proc)  # type: ignore[arg-type]
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_started_with_stdout_closed(env: Env) -> None:
    """``orch run ... >&-`` (cron, some daemons): no traceback, the run is done and recorded."""
    proc = subprocess.run(
        [ORCH, "run", "--split", "2", "--", "true"], cwd=env.cwd, env=orch_env(env.home),
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=30,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    detail = env.status(env.run_id())
    assert (detail["state"], detail["counts"]) == ("done", {"done": 2})


# --- logs -------------------------------------------------------------------------------


def test_logs_files_markers_and_the_logs_command(env: Env) -> None:
    script = env.script("talk.py", """\
import os, sys
me = os.environ["ORCH_SHARD_ID"]
for i in range(1, 4):
    print(f"out {me} {i}", flush=True)
print(f"err {me}", file=sys.stderr, flush=True)
sys.stdout.write(f"no newline at the end {me}")
""")
    env.write("s.csv", "id\na\nb\n")
    proc = env.orch("run", "--name", "mylogs", "--shards", "s.csv", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    assert run_id in proc.stdout.splitlines()[0]  # the run id is printed at the start
    detail = env.status("mylogs")
    assert detail["id"] == run_id and detail["name"] == "mylogs"
    for s in detail["shards"]:
        for key, body in (("log_stdout", [f"out {s['id']} {i}" for i in (1, 2, 3)]
                           + [f"no newline at the end {s['id']}"]),
                          ("log_stderr", [f"err {s['id']}"])):
            path = Path(s[key])
            assert path.parent == Path(detail["run_dir"]) / "logs"
            lines = path.read_text().splitlines()
            assert all(ISO_LINE.match(ln) for ln in lines), lines
            text = [ISO_LINE.sub("", ln) for ln in lines]
            started = STARTED.fullmatch(text[0])
            assert started and started.group(1) == "1" and int(started.group(2)) > 0, text
            ended = ENDED.fullmatch(text[-1])
            assert ended and ended.group(1, 2) == ("1", "exit 0"), text
            assert text[1:-1] == body

    one = env.orch("logs", "mylogs", "--shard", "a")
    assert one.returncode == 0, one.stderr
    body = [ISO_LINE.sub("", ln) for ln in one.stdout.splitlines()]
    assert body[1:4] == ["out a 1", "out a 2", "out a 3"] and "[stderr] err a" in body
    assert not any(ln.startswith("[") for ln in one.stdout.splitlines())

    err = env.orch("logs", run_id, "--shard", "a", "--stderr")
    assert err.returncode == 0, err.stderr
    assert [ISO_LINE.sub("", ln) for ln in err.stdout.splitlines()][1] == "err a"
    assert "out a" not in err.stdout

    tail = env.orch("logs", "mylogs", "--shard", "b", "--stdout", "--tail", "2")
    assert tail.returncode == 0, tail.stderr
    lines = [ISO_LINE.sub("", ln) for ln in tail.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0] == "no newline at the end b" and ENDED.fullmatch(lines[1])

    by_index = env.orch("logs", "mylogs", "--shard", "1")
    assert "out b 1" in by_index.stdout and "out a 1" not in by_index.stdout

    both = env.orch("logs", "mylogs")
    assert both.returncode == 0, both.stderr
    lines = both.stdout.splitlines()
    assert all(ln.startswith(("[a] ", "[b] ")) for ln in lines), lines
    for who in ("a", "b"):
        mine = [ln[4:] for ln in lines if ln.startswith(f"[{who}] ")]
        assert [ISO_LINE.sub("", ln) for ln in mine][1:4] == [f"out {who} {i}" for i in (1, 2, 3)]
    stamps = [ln[4:28] for ln in lines]
    assert stamps == sorted(stamps)  # interleaved by time

    missing = env.orch("logs", "mylogs", "--shard", "zzz")
    assert missing.returncode == 2 and missing.stderr.startswith("orch: ")
    assert "zzz" in missing.stderr and "Traceback" not in missing.stderr


def test_output_bursts_rotate_without_losing_lines(env: Env) -> None:
    script = env.script("burst.py", """\
import sys
for i in range(40000):
    sys.stdout.write(f"line {i} {'x' * 40}\\n")
""")
    env.write("orch.toml", f"""\
[tasks.burst]
command = [{json.dumps(PYTHON)}, {json.dumps(script)}]
split = 3
log_max_size = "256KB"
log_backups = 50
""")
    proc = env.orch("run", "burst")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    logs = Path(env.status(run_id)["run_dir"]) / "logs"
    assert (logs / "00000-0.out.1").exists()  # it did rotate
    for shard in ("0", "2"):
        out = env.orch("logs", run_id, "--shard", shard)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 40002
        assert STARTED.search(lines[0]) and ENDED.search(lines[-1])
        assert [ln.split()[2] for ln in lines[1:-1]] == [str(i) for i in range(40000)]


# --- orch.toml ------------------------------------------------------------------------


def test_orch_toml_task_and_cli_overrides(env: Env) -> None:
    script = env.script("record.py", RECORD)
    env.write("merchants.csv", "id,name\nm1,A\nm2,B\nm3,C\nm4,D\n")
    env.write("orch.toml", f"""\
[tasks.crawl]
command = [{json.dumps(PYTHON)}, {json.dumps(script)}, "--merchant", "{{id}}"]
shards = "merchants.csv"
jobs = 3
restart = "never"
env = {{ T_FROM = "file-{{name}}" }}
""")
    proc = env.orch("run", "crawl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    detail = env.status(run_id)
    assert (detail["name"], detail["jobs"], detail["shard_count"]) == ("crawl", 3, 4)
    assert detail["task"]["restart"] == "never"
    got = recorded(env)
    assert [got[i]["argv"] for i in range(4)] == [["--merchant", f"m{i}"] for i in (1, 2, 3, 4)]
    assert got[0]["env"]["T_FROM"] == "file-A"

    # every flag wins over the file: jobs, the shard list, the command, env, restart
    for p in (env.cwd / "out").iterdir():
        p.unlink()
    proc = env.orch("run", "crawl", "--jobs", "1", "--split", "2", "--restart", "on-failure",
                    "--env", "T_FROM=cli-{index}", "--name", "over",
                    "--", PYTHON, script, "cli", "{index}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    detail = env.status("over")
    assert (detail["jobs"], detail["shard_count"]) == (1, 2)
    assert detail["task"]["restart"] == "on-failure"
    got = recorded(env)
    assert [got[i]["argv"] for i in range(2)] == [["cli", "0"], ["cli", "1"]]
    assert [got[i]["env"]["T_FROM"] for i in range(2)] == ["cli-0", "cli-1"]


# --- status -----------------------------------------------------------------------------


def test_status_lists_runs_newest_first(env: Env) -> None:
    names = ["first", "second", "third"]
    for name in names:
        proc = env.orch("run", "--name", name, "--split", "1", "--", "true")
        assert proc.returncode == 0, proc.stderr
    env.write("s.txt", "only\n")
    failed = env.orch("run", "--name", "fourth", "--shards", "s.txt", "--max-restarts", "0",
                      "--", "false")
    assert failed.returncode == 1
    runs = env.status()
    assert [r["name"] for r in runs] == ["fourth", "third", "second", "first"]
    for r in runs:
        assert {"id", "name", "state", "started_at", "ended_at", "counts"} <= set(r)
        assert r["started_at"] <= r["ended_at"]
    assert [r["state"] for r in runs] == ["failed", "done", "done", "done"]
    assert runs[0]["counts"] == {"failed": 1} and runs[1]["counts"] == {"done": 1}
    detail = env.status(runs[0]["id"])
    assert {"id", "name", "state", "exit_code", "shards"} <= set(detail)
    assert {"id", "index", "state", "attempts", "pid", "exit_code", "last_error"} <= set(
        detail["shards"][0])
    text = env.orch("status")
    assert text.returncode == 0, text.stderr
    positions = [text.stdout.index(r["id"]) for r in runs]
    assert positions == sorted(positions)
    one = env.orch("status", "second")
    assert one.returncode == 0 and runs[2]["id"] in one.stdout
    # a name given to several runs means the newest of them
    again = env.orch("run", "--name", "first", "--split", "2", "--", "true")
    assert again.returncode == 0, again.stderr
    newest = env.status()[0]
    assert newest["name"] == "first" and newest["id"] not in {r["id"] for r in runs}
    assert env.status("first")["id"] == newest["id"]
    nope = env.orch("status", "no-such-run")
    assert nope.returncode == 2 and nope.stderr.count("\n") == 1
    assert nope.stderr.startswith("orch: ") and "no-such-run" in nope.stderr
