"""Heartbeats, progress, checkpoints and hang detection end to end (issue 3).

Every test drives the real ``orch`` CLI and real shard processes, each in its
own home and cwd under ``tmp_path`` (conftest.py ``env``). Processes are
waited for on a condition with a deadline (``poll_for``), never with a fixed
sleep; shard scripts that must wait for the test poll for a ``go`` file
(``WAIT_GO``) and give up after a minute. Values are watched through the run's
database (what ``orch status`` reads) when a test must sample fast, and
asserted through ``orch status RUN --json``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from helpers.progress import (
    DEADLINE_S,
    WAIT_GO,
    ask,
    attempts,
    dealer,
    finish,
    frame,
    orch_output,
    pid_alive,
    process_start,
    receive,
    shard_row,
    wait_live,
    wait_path,
)
from helpers.world import PYTHON, Env, by_id, poll_for

from shards import protocol as proto

HUGE = 10**15
#: Fast heartbeats and no backoff, so hang and restart tests take about a second.
QUICK = ("--heartbeat-interval", "0.2", "--backoff-initial", "0", "--stop-timeout", "2")
#: Slow heartbeats: between two of the shard's own, a forged count would stay in place.
SLOW_BEATS = ("--heartbeat-interval", "5", "--backoff-initial", "0")


def shard_script(env: Env, name: str, body: str) -> str:
    return env.script(name, WAIT_GO + body)


# --- progress ------------------------------------------------------------------------

ADVANCE = """
import shards
N = 2_000_000
shards.progress(0, total=N)
for _ in range(N):
    shards.advance()
"""


def test_two_million_advances_end_with_done_equal_total(env: Env) -> None:
    script = shard_script(env, "advance.py", ADVANCE)
    proc = env.orch("run", "--split", "1", "--", PYTHON, script, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    detail = env.status(env.run_id())
    shard = detail["shards"][0]
    assert (shard["state"], shard["done"], shard["total"]) == ("done", 2_000_000, 2_000_000)
    assert (detail["items_done"], detail["items_total"]) == (2_000_000, 2_000_000)


SHELL = """\
echo 'plain output'
echo '##orch {"done": 3, "total": 10}'
echo '##orch {"advance": 2}'
echo '##orch {"checkpoint": {"page": 5}, "message": "page 5"}'
echo '##orch not json'
touch reported
i=0
while [ ! -e go ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i + 1)); done
echo '##orch {"advance": 5}'
"""


def test_shell_shard_reports_progress_and_checkpoint_on_stdout(env: Env) -> None:
    script = env.script("report.sh", SHELL)
    proc = env.start("run", "--split", "1", "--", "/bin/sh", script)
    try:
        run_id, _ = wait_live(env)
        wait_path(env.cwd / "reported")
        # Live: the lines were read while the shard still runs.
        live = poll_for(
            lambda: (s := env.status(run_id)["shards"][0])["checkpoint"] is not None and s, 10.0
        )
        assert live, env.status(run_id)
        assert (live["state"], live["done"], live["total"]) == ("running", 5, 10)
        assert live["checkpoint"] == {"page": 5}
        (env.cwd / "go").touch()
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    detail = env.status(run_id)
    shard = detail["shards"][0]
    assert (shard["state"], shard["done"], shard["total"]) == ("done", 10, 10)
    assert shard["checkpoint"] == {"page": 5}
    assert shard_row(env, run_id)["checkpoint_done"] == 5
    assert detail["counters"].get("bad_stdout_lines") == 1
    log = Path(shard["log_stdout"]).read_text()
    assert "plain output" in log and '##orch {"done": 3' in log


SHELL_RESUME = """\
echo "arg=[$1] env=[${ORCH_CHECKPOINT-unset}] done=[${ORCH_CHECKPOINT_DONE-unset}]" >> seen.txt
if [ "$ORCH_ATTEMPT" = 1 ]; then
    echo '##orch {"done": 4, "total": 9, "checkpoint": {"page": 4}}'
    echo '##orch {"done": 6}'
    exit 1
fi
echo '##orch {"advance": 5}'
"""


def test_shell_shard_resumes_from_its_stdout_checkpoint(env: Env) -> None:
    script = env.script("resume.sh", SHELL_RESUME)
    proc = env.orch("run", "--split", "1", *QUICK, "--", "/bin/sh", script, "{checkpoint}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (env.cwd / "seen.txt").read_text().splitlines() == [
        "arg=[] env=[unset] done=[unset]",
        'arg=[{"page":4}] env=[{"page":4}] done=[4]',
    ]
    shard = env.status(env.run_id())["shards"][0]
    # Attempt 2 counts on from the checkpointed 4, not from attempt 1's last 6.
    assert (shard["state"], shard["attempts"], shard["done"], shard["total"]) == ("done", 2, 9, 9)
    assert shard["checkpoint"] == {"page": 4}


NO_NEWLINE = """\
echo '##orch {"done": 1, "total": 7}'
printf '##orch {"done": 7}'
"""


def test_last_protocol_line_without_a_newline_is_read(env: Env) -> None:
    # PHP's echo adds no newline: the last report of a script often has none.
    script = env.script("last.sh", NO_NEWLINE)
    proc = env.orch("run", "--split", "1", "--", "/bin/sh", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shard = env.status(env.run_id())["shards"][0]
    assert (shard["state"], shard["done"], shard["total"]) == ("done", 7, 7)


# --- hang and stall detection ------------------------------------------------------------

HANG = """
import os, time, shards
from pathlib import Path
here = Path(__file__).parent
if shards.info().attempt == 1:
    shards.progress(0)
    (here / "pid1").write_text(str(os.getpid()))
    while True:  # moves steadily until the test freezes it with SIGSTOP
        shards.advance()
        time.sleep(0.01)  # allowed-sleep: the shard's simulated work per item
shards.progress(1, total=1)
"""


def test_sigstopped_shard_is_replaced_within_heartbeat_timeout(env: Env) -> None:
    timeout_s = 1.5
    script = shard_script(env, "hang.py", HANG)
    proc = env.start("run", "--split", "1", *QUICK, "--heartbeat-timeout", str(timeout_s),
                     "--", PYTHON, script)
    started: str | None = None
    try:
        run_id, _ = wait_live(env)
        wait_path(env.cwd / "pid1")
        # The file can exist a moment before the shard's write lands in it.
        pid = int(poll_for(lambda: (env.cwd / "pid1").read_text().strip(), DEADLINE_S))
        started = process_start(pid)
        assert started is not None
        # The timeout applies once the shard has been heard from.
        assert poll_for(lambda: shard_row(env, run_id)["heartbeat_at"] is not None, DEADLINE_S)
        stopped_at = time.time()
        os.kill(pid, signal.SIGSTOP)
        second = poll_for(lambda: len(a := attempts(env, run_id)) >= 2 and a, DEADLINE_S)
        assert second, attempts(env, run_id)
        latency = second[1]["started_at"] - stopped_at
        # The last beat came at most an interval (0.2 s) before SIGSTOP.
        assert timeout_s - 0.4 <= latency <= timeout_s + 0.5, latency
        # One live attempt per shard: the frozen process was killed before attempt 2 began.
        assert not pid_alive(pid, started)
        first = second[0]
        assert "hung" in first["reason"], first
        assert first["signal"] in (signal.SIGTERM, signal.SIGKILL), first
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        text = (env.cwd / "pid1").read_text().strip() if (env.cwd / "pid1").exists() else ""
        if text:  # never leave a frozen process behind
            pid = int(text)
            if started is not None and pid_alive(pid, started):
                os.kill(pid, signal.SIGKILL)
    shard = env.status(run_id)["shards"][0]
    assert (shard["state"], shard["attempts"], shard["done"]) == ("done", 2, 1)


STALL = """
import threading, shards
from pathlib import Path
here = Path(__file__).parent
if shards.info().attempt == 1:
    shards.progress(1, total=2)
    (here / "blocked").write_text("")
    threading.Event().wait()  # stuck forever, like a read without a timeout; beats go on
shards.progress(2, total=2)
"""


def test_shard_without_progress_is_killed_as_stalled(env: Env) -> None:
    script = shard_script(env, "stall.py", STALL)
    proc = env.start("run", "--split", "1", *QUICK, "--heartbeat-timeout", "3",
                     "--stall-timeout", "1", "--", PYTHON, script)
    try:
        run_id, _ = wait_live(env)
        wait_path(env.cwd / "blocked")
        first_beat = poll_for(lambda: shard_row(env, run_id)["heartbeat_at"], DEADLINE_S)
        assert first_beat
        # Heartbeats keep arriving (liveness) while done stays at 1 (no progress).
        later = poll_for(
            lambda: (r := shard_row(env, run_id))["heartbeat_at"] > first_beat + 0.3 and r, 5.0
        )
        assert later and later["done"] == 1 and later["attempts"] == 1, later
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    first, second = attempts(env, run_id)
    assert "stalled" in first["reason"] and "hung" not in first["reason"], first
    assert first["signal"] == signal.SIGTERM, first
    assert first["ended_at"] - first["started_at"] >= 1.0, first
    assert second["exit_code"] == 0
    shard = env.status(run_id)["shards"][0]
    assert (shard["state"], shard["done"], shard["total"]) == ("done", 2, 2)


SLEEPER_ARGS = ("--require-heartbeat", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "1",
                "--max-restarts", "0", "--stop-timeout", "2")


def test_silent_shard_with_require_heartbeat_is_killed_as_hung(env: Env) -> None:
    begun = time.monotonic()
    proc = env.orch("run", "--split", "1", *SLEEPER_ARGS, "--", "sleep", "100")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert time.monotonic() - begun < 15
    run_id = env.run_id()
    shard = env.status(run_id)["shards"][0]
    assert shard["state"] == "failed" and "hung" in shard["reason"], shard
    (first,) = attempts(env, run_id)
    assert "hung" in first["reason"] and first["signal"] == signal.SIGTERM, first
    assert first["ended_at"] - first["started_at"] >= 1.0, first


MEMORY = """
import os, time
from pathlib import Path
here = Path(__file__).parent
if os.environ["ORCH_ATTEMPT"] == "1":
    hog = b"x" * (150 * 1024 * 1024)  # written, so resident
    (here / "hog").write_text(str(os.getpid()))
    time.sleep(HOLD_S)  # allowed-sleep: the shard holds its memory until the master kills it
"""


def test_shard_over_max_memory_is_restarted_with_reason_memory(env: Env) -> None:
    script = env.script("hog.py", MEMORY.replace("HOLD_S", "20"))
    proc = env.orch("run", "--split", "1", *QUICK, "--max-memory", "50MB", "--", PYTHON, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = env.run_id()
    first, second = attempts(env, run_id)
    assert "memory" in first["reason"], first
    assert first["signal"] == signal.SIGTERM, first
    assert second["exit_code"] == 0, second
    shard = env.status(run_id)["shards"][0]
    assert (shard["state"], shard["attempts"]) == ("done", 2)


def test_max_memory_counts_the_whole_attempt_not_only_its_leader(env: Env) -> None:
    # A wrapper script (./crawl.sh running php, npm running node) holds no memory itself.
    env.script("hog.py", MEMORY.replace("HOLD_S", "3"))
    wrapper = env.script("wrapper.sh", f'"{PYTHON}" hog.py\necho wrapped\n')
    proc = env.orch("run", "--split", "1", *QUICK, "--max-memory", "50MB", "--", "/bin/sh", wrapper)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = attempts(env, env.run_id())[0]
    assert "memory" in (first["reason"] or ""), first


# --- checkpoints ---------------------------------------------------------------------------

RESUME = """
import json, os, time, shards
from pathlib import Path
here = Path(__file__).parent
N, K, CRASH_AFTER = 600, 100, 350
me = shards.info()
cp = shards.last_checkpoint()
start = 0 if cp is None else cp["next"]
if me.attempt > 1:
    (here / f"seen{me.attempt}.json").write_text(json.dumps({
        "last_checkpoint": cp,
        "env_checkpoint": os.environ.get("ORCH_CHECKPOINT"),
        "env_checkpoint_done": os.environ.get("ORCH_CHECKPOINT_DONE"),
        "checkpoint_done": me.checkpoint_done,
    }))
with open(here / "items.txt", "a") as log:
    for i in shards.track(range(start, N), total=N):
        log.write(f"{me.attempt} {i}\\n")
        log.flush()
        time.sleep(0.002)  # allowed-sleep: the shard's simulated work per item
        if (i + 1) % K == 0:
            shards.checkpoint({"next": i + 1})
        if me.attempt == 1 and i + 1 == CRASH_AFTER:
            os._exit(1)  # no END, no atexit: a crash half-way
"""


def test_crashed_shard_resumes_from_its_checkpoint(env: Env) -> None:
    script = shard_script(env, "resume.py", RESUME)
    proc = env.start("run", "--split", "1", *QUICK, "--", PYTHON, script)
    samples: list[tuple[int, int, str, int | None, int | None]] = []
    try:
        run_id, _ = wait_live(env)
        floor = 0
        deadline = time.monotonic() + DEADLINE_S
        while proc.poll() is None and time.monotonic() < deadline:
            row = shard_row(env, run_id)
            done, cp_done = row["done"], row["checkpoint_done"]
            samples.append((len(samples), row["attempts"], row["state"], done, cp_done))
            if cp_done is not None:
                floor = max(floor, cp_done)
                # Shown progress never goes back past the last checkpoint.
                assert done is not None and done >= floor, samples[-5:]
            time.sleep(0.005)  # allowed-sleep: sampling pace of the progress-never-goes-back check
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    # The watch saw the second attempt run, already past its checkpoint.
    during_second = [s[3] for s in samples if s[1] == 2 and s[2] == "running" and s[3] is not None]
    assert during_second, samples
    assert min(during_second) >= 300, samples

    seen = json.loads((env.cwd / "seen2.json").read_text())
    assert seen == {
        "last_checkpoint": {"next": 300},
        "env_checkpoint": '{"next":300}',
        "env_checkpoint_done": "300",
        "checkpoint_done": 300,
    }, seen
    lines = [line.split() for line in (env.cwd / "items.txt").read_text().splitlines()]
    items = [(int(a), int(i)) for a, i in lines]
    assert [i for a, i in items if a == 1] == list(range(350))
    assert [i for a, i in items if a == 2] == list(range(300, 600))
    counts = Counter(i for _, i in items)
    assert all(counts[i] == 1 for i in range(300)), "an item before the checkpoint ran twice"
    assert set(counts) == set(range(600))

    shard = env.status(run_id)["shards"][0]
    summary = (shard["state"], shard["attempts"], shard["done"], shard["total"])
    assert summary == ("done", 2, 600, 600), shard
    assert shard["checkpoint"] == {"next": 600}
    first, _ = attempts(env, run_id)
    assert first["exit_code"] == 1


# --- the channel: stale attempts and garbage ---------------------------------------------------

STALE = """
import sys, shards
from pathlib import Path
here = Path(__file__).parent
me = shards.info()
shards.progress(5, total=10)
if me.attempt == 1:
    sys.exit(1)
(here / "running2").write_text("")
wait_go()
shards.checkpoint({"mine": me.attempt})
shards.progress(10)
"""


def test_stale_attempt_messages_are_ignored_and_counted(env: Env) -> None:
    script = shard_script(env, "stale.py", STALE)
    proc = env.start("run", "--split", "1", *SLOW_BEATS, "--", PYTHON, script)
    try:
        run_id, run = wait_live(env)
        wait_path(env.cwd / "running2")
        # Attempt 2 is current and has reported (a spawn resets done until it does).
        assert poll_for(
            lambda: (r := shard_row(env, run_id))["attempts"] == 2 and r["done"] == 5, DEADLINE_S
        ), shard_row(env, run_id)
        sent = 0
        with dealer(run["endpoint"]) as sock:
            for seq in range(1, 21):
                sock.send(proto.encode(proto.Message(
                    proto.Kind.HEARTBEAT, run_id, "0", 1, seq, done=HUGE, total=HUGE)))
                sent += 1
            for seq, kind in ((100, proto.Kind.CHECKPOINT), (101, proto.Kind.END)):
                sock.send(proto.encode(proto.Message(
                    kind, run_id, "0", 1, seq, done=HUGE, checkpoint={"evil": 1},
                    has_checkpoint=kind is proto.Kind.CHECKPOINT)))
                sent += 1
                reply = receive(sock)
                assert (reply.kind, reply.seq, reply.attempt) == (proto.Kind.NACK, seq, 1), reply
                assert reply.message and "stale" in reply.message, reply
        answer = poll_for(
            lambda: (r := ask(env, run_id, "status"))["dropped"]["stale"] >= sent and r
        )
        assert answer and answer["dropped"] == {"garbage": 0, "stale": sent}, answer
        assert answer["items_done"] == 5, answer  # the master's in-memory count, unflushed
        live = env.status(run_id)["shards"][0]
        summary = (live["attempts"], live["done"], live["total"], live["checkpoint"])
        assert summary == (2, 5, 10, None), live
        (env.cwd / "go").touch()
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    detail = env.status(run_id)
    shard = detail["shards"][0]
    assert (shard["done"], shard["total"], shard["checkpoint"]) == (10, 10, {"mine": 2})
    assert detail["counters"]["dropped_stale"] == sent
    assert detail["counters"].get("dropped_garbage", 0) == 0


GARBAGE_SHARD = """
import json, shards
from pathlib import Path
here = Path(__file__).parent
me = shards.info()
shards.progress(1, total=3)
(here / f"ready{me.index}").write_text("")
wait_go()
shards.checkpoint({"shard": me.index})
shards.progress(3)
(here / f"result{me.index}").write_text(json.dumps(shards.info().checkpoint))
"""


def test_garbage_on_the_endpoint_changes_nothing(env: Env) -> None:
    script = shard_script(env, "garbage.py", GARBAGE_SHARD)
    proc = env.start("run", "--split", "2", *SLOW_BEATS, "--", PYTHON, script)
    try:
        run_id, run = wait_live(env)
        for i in range(2):
            wait_path(env.cwd / f"ready{i}")
        assert poll_for(lambda: env.status(run_id)["items_done"] == 2, DEADLINE_S)

        def hb(**overrides: object) -> dict[str, object]:
            return {"v": 1, "k": "hb", "run": run_id, "sh": "0", "a": 1, "done": HUGE, **overrides}

        garbage: list[bytes] = [os.urandom(n) for n in (1, 2, 7, 64, 4096, 65536)]
        garbage += [b"", b"not json", b"[1, 2]", b"null", b'"hb"', b"\xff\xfe{", b"{" * 10000]
        garbage += [
            proto.encode(proto.Message(proto.Kind.HEARTBEAT, run_id, "0", 1, done=HUGE, v=2)),
            proto.encode(proto.Message(proto.Kind.HEARTBEAT, run_id, "0", 1, done=HUGE, v=0)),
            proto.encode(proto.Message(proto.Kind.HEARTBEAT, "another-run", "0", 1, done=HUGE)),
            proto.encode(proto.Message(proto.Kind.CHECKPOINT, "another-run", "0", 1,
                                       checkpoint={"evil": 1}, done=HUGE)),
            frame(**{k: v for k, v in hb().items() if k != "v"}),
            frame(**hb(v="1")), frame(**hb(k="zz")), frame(**hb(k=None)),
            frame(**hb(a=True)), frame(**hb(a=1.0)), frame(**hb(a=0)), frame(**hb(a="1")),
            frame(**hb(sh=0)), frame(**hb(sh="")), frame(**hb(run=None)),
            frame(**hb(done=-5)), frame(**hb(done="5")), frame(**hb(done=1.5)),
            frame(**hb(done=True)), frame(**hb(total=-1)), frame(**hb(msg=7)),
            frame(**hb(k="cp")),  # a checkpoint without "cp"
        ]
        multipart = [[b"x", b"", b"\xff" * 10], [b"", b""], [b"a"] * 5]
        with dealer(run["endpoint"]) as sock:
            for data in garbage:
                sock.send(data)
            for parts in multipart:
                sock.send_multipart(parts)
            # A forged shard id: well formed, but no such shard (garbage, and a NACK).
            sock.send(proto.encode(proto.Message(proto.Kind.HEARTBEAT, run_id, "no-such", 1,
                                                 done=HUGE)))
            sock.send(proto.encode(proto.Message(proto.Kind.CHECKPOINT, run_id, "no-such", 1, 9,
                                                 checkpoint={"evil": 1}, done=HUGE)))
            reply = receive(sock)
            assert (reply.kind, reply.seq) == (proto.Kind.NACK, 9), reply
        with dealer(run["endpoint"]) as sock:
            # Over the 1 MiB limit: ZeroMQ drops it (and the connection) before the master sees it.
            sock.send(b"{" + b" " * (proto.MAX_FRAME_BYTES + 10) + b"}")
        expected = len(garbage) + len(multipart) + 2  # the forged shard's two messages
        answer = poll_for(
            lambda: (r := ask(env, run_id, "status"))["dropped"]["garbage"] >= expected and r
        )
        assert answer and answer["dropped"] == {"garbage": expected, "stale": 0}, answer
        assert (answer["items_done"], answer["items_total"]) == (2, 6), answer
        # Nothing changed: the run still answers, and no count moved.
        live = env.status(run_id)
        assert [(s["state"], s["done"], s["total"], s["checkpoint"]) for s in live["shards"]] == [
            ("running", 1, 3, None)] * 2
        (env.cwd / "go").touch()
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    detail = env.status(run_id)
    assert (detail["state"], detail["exit_code"]) == ("done", 0)
    assert (detail["items_done"], detail["items_total"]) == (6, 6)
    for i, shard in enumerate(detail["shards"]):
        summary = (shard["state"], shard["attempts"], shard["done"], shard["total"])
        assert summary == ("done", 1, 3, 3), shard
        assert shard["checkpoint"] == {"shard": i}
        assert json.loads((env.cwd / f"result{i}").read_text()) == {"shard": i}
    assert detail["counters"]["dropped_garbage"] == expected
    assert detail["counters"].get("dropped_stale", 0) == 0


PACED = """
import shards
from pathlib import Path
shards.progress(0, total=1000)
(Path(__file__).parent / f"running{shards.info().index}").write_text("")
wait_go()
shards.progress(1000)
"""


def test_run_total_is_unknown_while_a_shard_has_not_reported_one(env: Env) -> None:
    script = shard_script(env, "paced.py", PACED)
    proc = env.start("run", "--split", "2", "-j", "1", *QUICK, "--", PYTHON, script)
    try:
        run_id, _ = wait_live(env)
        wait_path(env.cwd / "running0")
        assert poll_for(lambda: shard_row(env, run_id)["total"] == 1000, DEADLINE_S)
        detail = env.status(run_id)
        assert [s["state"] for s in detail["shards"]] == ["running", "pending"]
        assert ask(env, run_id, "status")["items_total"] is None
        # Shard 1 has not started: the run's total (and so its ETA) cannot be 1000.
        assert detail["items_total"] is None or detail["items_total"] >= 2000, detail
        (env.cwd / "go").touch()
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()


# --- Python callables -----------------------------------------------------------------------

CRAWL = """
import shards
from pathlib import Path

def crawl(shard):
    assert shard.count == 2
    for _ in shards.track(range(100 + shard.index)):
        pass
    shards.checkpoint({"index": shard.index, "attempt": shard.attempt})
    (Path(__file__).parent / f"crawled{shard.index}").write_text(shard.shard_id)
"""

FAILING = """
import shards

def crawl(shard):
    shards.progress(1, total=10)
    raise ValueError(f"boom-in-crawl shard {shard.index}")
"""


def test_python_callable_task_runs_with_the_sdk(env: Env) -> None:
    env.script("mymod.py", CRAWL)
    proc = env.orch("run", "mymod:crawl", "--split", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    detail = env.status(env.run_id())
    assert (detail["state"], detail["items_done"], detail["items_total"]) == ("done", 201, 201)
    for i, shard in enumerate(detail["shards"]):
        assert (shard["state"], shard["done"], shard["total"]) == ("done", 100 + i, 100 + i)
        assert shard["checkpoint"] == {"index": i, "attempt": 1}
        assert (env.cwd / f"crawled{i}").read_text() == str(i)


def test_python_callable_exception_fails_the_attempt_with_its_traceback(env: Env) -> None:
    env.script("badmod.py", FAILING)
    proc = env.orch("run", "badmod:crawl", "--split", "1", "--max-restarts", "0")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    shard = by_id(env.status(env.run_id()))["0"]
    assert shard["state"] == "failed" and shard["exit_code"] == 1, shard
    assert "boom-in-crawl shard 0" in (shard["last_error"] or ""), shard
    assert "ValueError" in (shard["reason"] or "") + (shard["last_error"] or ""), shard
    err = Path(shard["log_stderr"]).read_text()
    assert "Traceback (most recent call last)" in err
    assert "ValueError: boom-in-crawl shard 0" in err
    assert 'badmod.py", line 6, in crawl' in err


# --- what status shows ---------------------------------------------------------------------------

STEADY = """
import time, shards
from pathlib import Path
shards.progress(0, total=1_000_000)
go = Path(__file__).parent / "go"
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    shards.advance(10)
    time.sleep(0.005)  # allowed-sleep: the shard's simulated work per item (deadline-bounded)
"""

LIVE_FIELDS = ("rate", "eta_s", "heartbeat_age_s", "cpu_percent", "rss_bytes")


def test_status_shows_rate_eta_heartbeat_cpu_and_rss_while_running(env: Env) -> None:
    script = shard_script(env, "steady.py", STEADY)
    proc = env.start("run", "--split", "1", *QUICK, "--", PYTHON, script)
    try:
        run_id, _ = wait_live(env)

        def complete() -> dict[str, Any] | None:
            detail = env.status(run_id)
            shard = detail["shards"][0]
            ready = all(shard[k] is not None for k in LIVE_FIELDS)
            return detail if ready and detail["rate"] is not None else None

        detail = poll_for(complete, DEADLINE_S)
        assert detail, env.status(run_id)
        shard = detail["shards"][0]
        assert shard["state"] == "running"
        assert shard["rate"] > 0 and shard["eta_s"] > 0
        assert 0 <= shard["heartbeat_age_s"] < 5
        assert shard["cpu_percent"] >= 0
        assert shard["rss_bytes"] > 1024 * 1024
        assert detail["rate"] > 0 and detail["eta_s"] > 0
        assert 0 < detail["items_done"] < detail["items_total"] == 1_000_000
        (env.cwd / "go").touch()
        assert finish(env, proc) == 0, orch_output(env)
    finally:
        (env.cwd / "go").touch()
    shard = env.status(run_id)["shards"][0]
    assert shard["state"] == "done"
    assert shard["heartbeat_age_s"] is None and shard["rss_bytes"] is None
