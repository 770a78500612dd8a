"""Detached runs steered from a second process: issue 4's control-plane tests.

Every verb runs as a separate ``orch`` process against a master started with
``orch run -d``, exactly as a user in another ssh session would. Conditions
are polled with a deadline (the database is read directly, read-only, which
is what ``orch status`` does too); no test sleeps to wait for a process.
Teardown kills, by pid, every process carrying the test's ORCH_HOME.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from helpers.control import (
    Run,
    alive,
    control_request,
    detached_env,
    environ,
    home_pids,
    proc_stat,
    start_detached,
)
from helpers.world import ORCH, Env, orch_env, poll_for


@pytest.fixture
def denv(tmp_path: Path) -> Iterator[Env]:
    yield from detached_env(tmp_path)


#: A shard that never ends by itself (the test stops it), one process, no shell parsing of values.
FOREVER = ["sh", "-c", "echo started $ORCH_SHARD_ID attempt $ORCH_ATTEMPT; exec sleep 60"]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("orch: "), proc.stderr
    return lines[0]


# --- orch run -d ------------------------------------------------------------------------


def test_detach_returns_at_once_and_the_master_is_a_daemon(denv: Env) -> None:
    t0 = time.monotonic()
    proc = denv.orch("run", "-d", "--split", "3", "--", *FOREVER)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    run = Run(denv, proc.stdout.strip().splitlines()[-1])
    assert run.dir.is_dir(), proc.stdout
    # At once: the shards never finish by themselves, and they are running.
    assert elapsed < 5.0, elapsed
    assert poll_for(lambda: run.count("running") == 3, timeout=10), run.states()
    assert run.row()["state"] == "running"

    pid = run.master_pid()
    stat = proc_stat(pid)
    assert stat is not None
    session, tty_nr = int(stat[3]), int(stat[4])
    assert session == pid, "the master leads a new session"
    assert session != os.getsid(0)
    assert tty_nr == 0, "no controlling terminal"
    assert (run.dir / "master.log").exists()
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.path.samefile(os.readlink(f"/proc/{pid}/fd/1"), run.dir / "master.log")
    # Shards are not the test's children either: they belong to the master.
    for shard_pid in run.pids():
        stat = proc_stat(shard_pid)
        assert stat is not None and int(stat[1]) == pid

    stop = denv.orch("stop", run.id)
    assert stop.returncode == 0, stop.stderr
    assert denv.orch("wait", run.id, timeout=20).returncode == 1  # stopped is not done
    assert not alive(pid)
    assert run.pids() == []


def test_detach_of_a_run_that_ends_at_once(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", "true"))
    assert denv.orch("wait", run.id, timeout=20).returncode == 0
    assert run.states() == {"0": "done", "1": "done"}


# --- the verbs, from a second process ------------------------------------------------------


def test_status_and_logs_of_a_detached_run(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", *FOREVER))
    logs = run.dir / "logs"
    assert poll_for(lambda: run.count("running") == 2 and
                    all("started" in p.read_text() for p in logs.glob("*.out"))
                    and len(list(logs.glob("*.out"))) == 2, timeout=10)

    text = denv.orch("status", run.id)
    assert text.returncode == 0, text.stderr
    assert run.id in text.stdout and "running" in text.stdout
    js = denv.orch("status", run.id, "--json")
    assert js.returncode == 0, js.stderr
    detail = json.loads(js.stdout)
    assert (detail["id"], detail["state"], detail["counts"]) == (run.id, "running", {"running": 2})
    assert all(s["pid"] and s["attempts"] == 1 for s in detail["shards"])
    listing = json.loads(denv.orch("status", "--json").stdout)
    assert [(r["id"], r["state"]) for r in listing] == [(run.id, "running")]

    one = denv.orch("logs", run.id, "--shard", "1")
    assert one.returncode == 0, one.stderr
    assert "started 1 attempt 1" in one.stdout and "started 0" not in one.stdout
    both = denv.orch("logs", run.id)
    assert "[0] " in both.stdout and "[1] " in both.stdout
    assert denv.orch("stop", run.id).returncode == 0


def test_stop_one_shard_then_the_whole_run(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "3", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 3, timeout=10), run.states()

    proc = denv.orch("stop", run.id, "--shard", "1")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.states()["1"] == "stopped", timeout=10), run.states()
    states = run.states()
    assert (states["0"], states["2"]) == ("running", "running")
    shard1 = run.shards()["1"]
    assert shard1["reason"] == "stopped by user" and shard1["pid"] is None
    assert sorted(int(s["ORCH_SHARD_INDEX"]) for s in _envs(run)) == [0, 2]
    assert run.row()["state"] == "running"

    proc = denv.orch("stop", run.id)
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.row()["state"] != "running", timeout=15)
    assert run.row()["state"] == "stopped"
    assert run.states() == {"0": "stopped", "1": "stopped", "2": "stopped"}
    assert poll_for(lambda: not run.pids(), timeout=5)
    detail = denv.status(run.id)
    assert detail["state"] == "stopped" and detail["exit_code"] == 1


def _envs(run: Run) -> list[dict[str, str]]:
    return [environ(p) for p in run.pids()]


def test_restart_a_running_shard_and_one_in_backoff(denv: Env) -> None:
    # Shard 1 fails its first two attempts (the first restart of a streak is immediate)
    # and then waits a 60 s backoff; shard 0 runs on.
    cmd = ('if [ "$ORCH_SHARD_INDEX" = 1 ] && [ "$ORCH_ATTEMPT" -le 2 ]; then exit 3; fi; '
           "echo attempt $ORCH_ATTEMPT; exec sleep 60")
    run = Run(denv, start_detached(denv, "--split", "2", "--backoff-initial", "60s",
                                   "--backoff-max", "60s", "--", "sh", "-c", cmd))
    assert poll_for(lambda: run.states() == {"0": "running", "1": "backoff"}, timeout=10), \
        run.states()
    before = run.shards()["0"]

    t0 = time.monotonic()
    proc = denv.orch("restart", run.id, "--shard", "0")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.shards()["0"]["attempts"] == 2
                    and run.shards()["0"]["state"] == "running", timeout=10), run.shards()["0"]
    after = run.shards()["0"]
    assert after["pid"] != before["pid"]
    assert not alive(before["pid"])

    proc = denv.orch("restart", run.id, "--shard", "1")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.shards()["1"]["attempts"] == 3
                    and run.shards()["1"]["state"] == "running", timeout=10), run.shards()["1"]
    # Far sooner than the 60 s backoff: the restart did not wait for it.
    assert time.monotonic() - t0 < 30
    log = denv.orch("logs", run.id, "--shard", "1")
    assert "attempt 3" in log.stdout
    # One live attempt per shard, each the newest.
    assert sorted((e["ORCH_SHARD_ID"], e["ORCH_ATTEMPT"]) for e in _envs(run)) == [
        ("0", "2"), ("1", "3")]
    assert denv.orch("stop", run.id).returncode == 0


def test_restart_in_a_full_run_takes_the_freed_slot_itself(denv: Env) -> None:
    """'A new attempt now': with every slot taken and shards waiting, the restarted
    shard gets the slot its own old attempt frees, not the next shard in line."""
    run = Run(denv, start_detached(denv, "--split", "4", "--jobs", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10), run.states()
    assert run.states() == {"0": "running", "1": "running", "2": "pending", "3": "pending"}
    proc = denv.orch("restart", run.id, "--shard", "0")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.attempts()["0"] == 2 and run.states()["0"] == "running",
                    timeout=10), run.shards()["0"]
    assert run.states() == {"0": "running", "1": "running", "2": "pending", "3": "pending"}
    assert denv.orch("stop", run.id).returncode == 0


def test_scale_changes_how_many_shards_run(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "6", "--jobs", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10), run.states()
    assert run.count("pending") == 4

    proc = denv.orch("scale", run.id, "--jobs", "4")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: denv.status(run.id)["counts"].get("running") == 4, timeout=10)
    detail = denv.status(run.id)
    assert detail["counts"] == {"running": 4, "pending": 2}
    assert detail["jobs"] == 4, "status shows the limit in force"
    assert len({e["ORCH_SHARD_ID"] for e in _envs(run)}) == 4

    # Scaling down stops the newest surplus at once, back to pending (not failed).
    proc = denv.orch("scale", run.id, "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: run.count("running") == 1 and run.count("pending") == 5, timeout=10)
    assert run.count("failed") == 0

    bad = denv.orch("scale", run.id, "--jobs", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert denv.orch("stop", run.id).returncode == 0


def test_wait_exits_with_the_run_exit_code(denv: Env) -> None:
    quick = 'echo working; sleep 0.5; exit "$RC"'
    ok = Run(denv, start_detached(denv, "--split", "3", "--env", "RC=0", "--", "sh", "-c", quick))
    bad = Run(denv, start_detached(denv, "--split", "3", "--restart", "never",
                                   "--env", "RC={index}", "--", "sh", "-c", quick))
    waiters = [subprocess.Popen([ORCH, "wait", r.id], cwd=denv.cwd, env=orch_env(denv.home),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for r in (ok, bad)]
    try:
        codes = [w.wait(timeout=30) for w in waiters]
    finally:
        for w in waiters:
            if w.poll() is None:
                w.kill()
                w.wait()
            w.stdout.close()  # type: ignore[union-attr]
            w.stderr.close()  # type: ignore[union-attr]
    assert codes == [0, 1]
    assert (ok.row()["state"], bad.row()["state"]) == ("done", "failed")
    assert bad.states() == {"0": "done", "1": "failed", "2": "failed"}
    # An ended run: wait returns at once with the same code.
    assert denv.orch("wait", ok.id).returncode == 0
    assert denv.orch("wait", bad.id).returncode == 1


def test_a_run_is_steered_by_its_name(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--name", "nightly", "--split", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10)
    assert denv.status("nightly")["id"] == run.id
    assert denv.orch("logs", "nightly", "--shard", "0").returncode == 0
    assert denv.orch("scale", "nightly", "--jobs", "3").returncode == 0
    assert denv.orch("restart", "nightly", "--shard", "1").returncode == 0
    assert poll_for(lambda: run.attempts()["1"] == 2, timeout=10)
    assert denv.orch("stop", "nightly", "--shard", "0").returncode == 0
    assert poll_for(lambda: run.states()["0"] == "stopped", timeout=10)
    assert denv.orch("stop", "nightly").returncode == 0
    assert denv.orch("wait", "nightly", timeout=20).returncode == 1
    assert run.row()["state"] == "stopped"


# --- logs -f ----------------------------------------------------------------------------------


def _stamp(line: str) -> float:
    text = line.split("] ", 1)[-1].split(" ", 1)[0]
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class _Stdout:
    """A process's stdout read as it comes: whole lines, each with its arrival time (wall clock).

    One reader for the process's whole life, so no line is cut between two reads.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.lines: list[tuple[float, str]] = []
        self.ended = False  # end of file: the process closed its stdout
        self._buf = b""

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read until ``done()``, the end of file or ``timeout`` s; return ``done()``."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while not done() and not self.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not sel.select(timeout=left):
                    continue
                try:
                    chunk = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.ended = True
                    break
                now = time.time()
                *lines, self._buf = (self._buf + chunk).split(b"\n")
                self.lines.extend((now, ln.decode(errors="replace")) for ln in lines)
        return done()


def _ticks(lines: list[tuple[float, str]]) -> list[int]:
    return [int(ln.rsplit(" ", 1)[1]) for _, ln in lines if " tick " in ln]


def test_logs_follow_shows_lines_as_they_are_written(denv: Env) -> None:
    tick = "i=0; while [ $i -lt 300 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"
    run = Run(denv, start_detached(denv, "--split", "2", "--", "sh", "-c", tick))
    assert poll_for(lambda: run.count("running") == 2, timeout=10)
    follows = {
        key: subprocess.Popen([ORCH, "logs", run.id, *extra, "-f"], cwd=denv.cwd,
                              env=orch_env(denv.home), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for key, extra in (("one", ["--shard", "1"]), ("all", []))
    }
    one, both = _Stdout(follows["one"]), _Stdout(follows["all"])

    def followed() -> list[tuple[float, str]]:
        """The tick lines -f printed as they were written: stamped after its first line
        arrived, so not in its dump of what was there when it started (its start may take
        a second or more on a loaded machine, and the dump then holds that many lines)."""
        if not one.lines:
            return []
        began = one.lines[0][0]
        return [(at, ln) for at, ln in one.lines if " tick " in ln and _stamp(ln) > began]

    def trickled() -> bool:
        lines = followed()
        return len(lines) >= 10 and lines[-1][0] - lines[0][0] > 0.5

    try:
        assert one.read_until(trickled, timeout=20), ("lines trickled in over time", one.lines)
        assert both.read_until(lambda: len(both.lines) >= 15, timeout=10), both.lines
        numbers = _ticks(one.lines)
        assert numbers == list(range(len(numbers))), numbers  # each once, in order: dump, then -f
        # As they are written: each line arrives soon after its timestamp, not in a batch.
        latency = [arrived - _stamp(ln) for arrived, ln in followed()]
        assert max(latency) < 2.5, latency
        prefixes = {ln.split(" ", 1)[0] for _, ln in both.lines}
        assert prefixes == {"[0]", "[1]"}, both.lines

        # When the run ends, -f prints the last lines and exits by itself.
        assert denv.orch("stop", run.id).returncode == 0
        assert one.read_until(lambda: one.ended, timeout=20), one.lines[-3:]
        assert follows["one"].wait(timeout=5) == 0
        assert "## orch: attempt 1 ended" in one.lines[-1][1], one.lines[-3:]
        numbers = _ticks(one.lines)
        assert numbers == list(range(len(numbers))), numbers  # to the last: none lost or twice
        assert both.read_until(lambda: both.ended, timeout=20), both.lines[-3:]
        assert follows["all"].wait(timeout=10) == 0
    finally:
        for p in follows.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]


def test_logs_follow_of_an_ended_run_exits(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", "echo", "hello"))
    assert denv.orch("wait", run.id).returncode == 0
    proc = denv.orch("logs", run.id, "-f", timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hello") == 2


# --- the event feed ------------------------------------------------------------------------------


def test_events_stream_state_changes_until_the_run_ends(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10)
    feed = subprocess.Popen([ORCH, "events", run.id], cwd=denv.cwd, env=orch_env(denv.home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    reader = _Stdout(feed)  # one reader: a line cut between two reads is kept whole
    try:
        # A subscriber joins at some point after it connects (ZeroMQ PUB/SUB): restart a
        # shard until its state changes come through.
        for _ in range(10):
            assert denv.orch("restart", run.id, "--shard", "0").returncode == 0
            if reader.read_until(lambda: len(reader.lines) >= 2, timeout=1.5) or reader.lines:
                break
        seen = [json.loads(ln) for _, ln in reader.lines if ln]
        assert seen, "no event within 10 restarts"
        assert all(e["v"] == 1 and e["shard"] == "0" for e in seen), seen
        before = len(reader.lines)
        assert denv.orch("stop", run.id).returncode == 0
        assert reader.read_until(lambda: reader.ended, timeout=10), reader.lines[-3:]
        rest = [json.loads(ln) for _, ln in reader.lines[before:] if ln]
        assert feed.wait(timeout=5) == 0, feed.stderr.read()  # type: ignore[union-attr]
    finally:
        if feed.poll() is None:
            feed.kill()
            feed.wait()
        feed.stdout.close()  # type: ignore[union-attr]
        feed.stderr.close()  # type: ignore[union-attr]
    stopped = {e["shard"] for e in rest if e.get("state") == "stopped"}
    assert stopped == {"0", "1"}, rest
    assert rest[-1] == {"v": 1, "run": "stopped", "exit_code": 1}, rest[-1]


def test_events_end_when_the_master_dies(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "1", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 1, timeout=10)
    feed = subprocess.Popen([ORCH, "events", run.id], cwd=denv.cwd, env=orch_env(denv.home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert poll_for(lambda: any(is_orch_events(p) for p in home_pids(denv.home)), timeout=5)
        run.kill_master(signal.SIGKILL)
        t0 = time.monotonic()
        code = feed.wait(timeout=10)
        elapsed = time.monotonic() - t0
        err = feed.stderr.read()  # type: ignore[union-attr]
    finally:
        if feed.poll() is None:
            feed.kill()
            feed.wait()
        feed.stderr.close()  # type: ignore[union-attr]
    assert code == 3, err
    assert elapsed < 5.0, elapsed
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def is_orch_events(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"events" in f.read().split(b"\0")
    except OSError:
        return False


# --- a dead or frozen master ------------------------------------------------------------------


def test_a_dead_master_shows_as_lost_and_verbs_fail_fast(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10)
    run.kill_master(signal.SIGKILL)
    assert poll_for(lambda: not alive(int((run.dir / "master.pid").read_text())), timeout=5)

    detail = denv.status(run.id)
    assert detail["state"] == "lost"
    text = denv.orch("status", run.id)
    assert "lost" in text.stdout and f"orch resume {run.id}" in text.stdout
    listing = denv.orch("status")
    assert "lost" in listing.stdout and "resume" in listing.stdout

    for verb in (["stop", run.id], ["stop", run.id, "--shard", "0"],
                 ["restart", run.id, "--shard", "0"], ["scale", run.id, "--jobs", "3"],
                 ["wait", run.id]):
        t0 = time.monotonic()
        proc = denv.orch(*verb, timeout=10)
        elapsed = time.monotonic() - t0
        assert proc.returncode != 0, (verb, proc.stdout)
        assert elapsed < 3.0, (verb, elapsed)
        line = one_line_error(proc)
        assert "lost" in line and "resume" in line, (verb, line)


def test_a_frozen_master_times_out_quickly(denv: Env) -> None:
    run = Run(denv, start_detached(denv, "--split", "2", "--", *FOREVER))
    assert poll_for(lambda: run.count("running") == 2, timeout=10)
    pid = run.master_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        proc = denv.orch("scale", run.id, "--jobs", "3", timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 4.0, elapsed
    assert "did not answer" in one_line_error(proc)
    # Thawed, it answers again.
    assert denv.orch("scale", run.id, "--jobs", "2").returncode == 0
    assert denv.orch("stop", run.id).returncode == 0


# --- garbage on the control socket ---------------------------------------------------------------

GARBAGE: list[tuple[bytes, str]] = [
    (b"not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[" * 5000, "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"ping"', "JSON object"),
    (b"null", "JSON object"),
    (b'{"op": "ping"}', "version"),
    (b'{"v": 2, "op": "ping"}', "version"),
    (b'{"v": "1", "op": "ping"}', "version"),
    (b'{"v": 1}', "unknown op"),
    (b'{"v": 1, "op": "explode"}', "unknown op"),
    (b'{"v": 1, "op": ["ping"]}', "unknown op"),
    (b'{"v": 1, "op": "__init__"}', "unknown op"),
    (b'{"v": 1, "op": "scale", "jobs": "x"}', "jobs"),
    (b'{"v": 1, "op": "scale", "jobs": 0}', "jobs"),
    (b'{"v": 1, "op": "scale", "jobs": -3}', "jobs"),
    (b'{"v": 1, "op": "scale", "jobs": 2.5}', "jobs"),
    (b'{"v": 1, "op": "scale", "jobs": true}', "jobs"),
    (b'{"v": 1, "op": "scale"}', "jobs"),
    (b'{"v": 1, "op": "stop", "shard": 5}', "shard"),
    (b'{"v": 1, "op": "stop", "shard": ["0"]}', "shard"),
    (b'{"v": 1, "op": "restart", "shard": {"id": "0"}}', "shard"),
    (b'{"v": 1, "op": "restart", "rolling": 0}', "rolling"),
    (b'{"v": 1, "op": "restart", "rolling": "2"}', "rolling"),
    (b'{"v": 1, "op": "restart", "shard": "0", "rolling": 1}', "rolling"),
    (b'{"v": 1, "op": "stop", "shard": "no-such-shard"}', "no shard"),
    (b'{"v": 1, "op": "restart", "shard": "no-such-shard"}', "no shard"),
]


def test_garbage_on_the_control_socket_gets_error_replies(denv: Env) -> None:
    work = "echo working; sleep 1.5"
    run = Run(denv, start_detached(denv, "--split", "3", "--", "sh", "-c", work))
    endpoint = run.control()
    assert endpoint.startswith("ipc://")
    sock_path = endpoint[len("ipc://"):]
    assert os.stat(sock_path).st_mode & 0o077 == 0, "control socket is private"

    for payload, needle in GARBAGE:
        reply = control_request(endpoint, payload)
        assert reply is not None, f"no reply to {payload[:40]!r}"
        assert reply["ok"] is False and reply["v"] == 1, (payload[:40], reply)
        assert isinstance(reply["error"], str) and needle in reply["error"], (payload[:40], reply)
        assert "\n" not in reply["error"]
    # Larger than the socket accepts: dropped, and the master lives on.
    assert control_request(endpoint, b"{" + b" " * (128 * 1024) + b"}", timeout_s=0.5) is None
    ping = control_request(endpoint, orjson.dumps({"v": 1, "op": "ping"}))
    assert ping is not None and ping["ok"] is True and ping["pid"] == run.master_pid()
    status = control_request(endpoint, orjson.dumps({"v": 1, "op": "status"}))
    assert status is not None and status["ok"] is True and status["run"] == run.id
    assert run.states() == {"0": "running", "1": "running", "2": "running"}, "nothing was stopped"

    assert denv.orch("wait", run.id, timeout=30).returncode == 0
    assert run.row()["state"] == "done"
    assert run.attempts() == {"0": 1, "1": 1, "2": 1}


# --- SIGTERM to the detached master -------------------------------------------------------------


def test_sigterm_to_a_detached_master_stops_everything_gracefully(denv: Env) -> None:
    # A shell with a background grandchild: the whole group must go.
    run = Run(denv, start_detached(denv, "--split", "3", "--", "sh", "-c",
                                   "sleep 60 & echo started; wait"))
    assert poll_for(lambda: run.count("running") == 3 and len(run.pids()) >= 6, timeout=10), \
        run.pids()
    pid = run.master_pid()
    os.kill(pid, signal.SIGTERM)
    assert poll_for(lambda: not alive(pid), timeout=15), "master did not exit"
    assert poll_for(lambda: not run.pids(), timeout=5), run.pids()
    row = run.row()
    assert (row["state"], row["exit_code"]) == ("stopped", 128 + signal.SIGTERM)
    assert run.states() == {"0": "stopped", "1": "stopped", "2": "stopped"}
    assert denv.status(run.id)["state"] == "stopped"
    # Nothing of the run is left: no master, no guardian, no attempt.
    assert poll_for(lambda: not home_pids(denv.home), timeout=5), home_pids(denv.home)
    assert denv.orch("wait", run.id).returncode == 128 + signal.SIGTERM
