"""The shard SDK and runner against a real ROUTER socket, with real shard processes.

The test plays the master: ``FakeMaster`` binds a ROUTER at ipc:// in
tmp_path on its own thread, records every decoded message and answers
checkpoints and END per its policy. Shards are subprocesses of the venv's
python started with the ORCH_* environment. Waits are conditions with
deadlines, never fixed sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import pytest
import zmq

from shards import protocol as p

REPO = Path(__file__).resolve().parents[2]
Kind = p.Kind


class FakeMaster:
    """A ROUTER on its own thread that records messages and answers per policy."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.messages: list[tuple[bytes, p.Message]] = []
        self.checkpoint_reply = "ack"  # "ack" | "nack" | "ignore" | "wrong-seq"
        self.end_reply = "ack"
        self._cond = threading.Condition()
        self._stop = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self._sock.poll(50):
                continue
            ident, frame = self._sock.recv_multipart()
            msg = p.decode(frame)
            with self._cond:
                self.messages.append((ident, msg))
                self._cond.notify_all()
            policy = {Kind.CHECKPOINT: self.checkpoint_reply, Kind.END: self.end_reply}
            self._answer(ident, msg, policy.get(msg.kind, "none"))

    def _answer(self, ident: bytes, msg: p.Message, policy: str) -> None:
        if policy in ("none", "ignore"):
            return
        kind = Kind.NACK if policy == "nack" else Kind.ACK
        seq = msg.seq + 1000 if policy == "wrong-seq" else msg.seq
        text = f"stale attempt {msg.attempt}" if policy == "nack" else None
        reply = p.Message(kind, msg.run, msg.shard, msg.attempt, seq, message=text)
        self._sock.send_multipart([ident, p.encode(reply)])

    def wait_for(
        self, pred: Callable[[list[p.Message]], bool], timeout_s: float = 10.0
    ) -> list[p.Message]:
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self.msgs()), timeout_s)
            assert ok, f"condition not met within {timeout_s}s; got {self.msgs()}"
            return self.msgs()

    def msgs(self, kind: Kind | None = None) -> list[p.Message]:
        return [m for _, m in list(self.messages) if kind is None or m.kind is kind]

    def identities(self) -> set[bytes]:
        return {ident for ident, _ in list(self.messages)}

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


def kinds(kind: Kind) -> Callable[[list[p.Message]], bool]:
    return lambda ms: any(m.kind is kind for m in ms)


@pytest.fixture
def master(tmp_path: Path) -> Iterator[FakeMaster]:
    path = tmp_path / "hb.sock"
    assert len(str(path)) < 100, "ipc paths are limited to ~107 bytes"
    fake = FakeMaster(f"ipc://{path}")
    yield fake
    fake.close()


def shard_env(endpoint: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = str(REPO)  # the package under test, whatever the install
    if endpoint is not None:
        env.update(
            ORCH_RUN_ID="r1",
            ORCH_SHARD_ID="s1",
            ORCH_SHARD_INDEX="3",
            ORCH_SHARD_COUNT="8",
            ORCH_ATTEMPT="1",
            ORCH_SHARD='{"merchant": "acme"}',
            ORCH_ENDPOINT=endpoint,
            ORCH_HEARTBEAT_INTERVAL="0.2",
            ORCH_MASTER_PID=str(os.getpid()),
        )
    env.update(extra)
    return env


def start(
    code: str, endpoint: str | None, cwd: Path, *args: str, **env: str
) -> subprocess.Popen[str]:
    argv = [sys.executable, *args] if args else [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(
        argv,
        env=shard_env(endpoint, **env),
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as the master does; killpg must never reach pytest
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def poll_until(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)  # allowed-sleep: poll interval of poll_until itself


# -- heartbeats, progress, END -------------------------------------------------------


def test_heartbeats_carry_identity_progress_and_rss(master: FakeMaster, tmp_path: Path) -> None:
    code = """
        import signal, sys
        names = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGCHLD", "SIGPIPE", "SIGUSR1"]
        before = [signal.getsignal(getattr(signal, n)) for n in names]
        import shards
        shards.advance(3)
        ok = [signal.getsignal(getattr(signal, n)) for n in names] == before
        print("signals untouched" if ok else "signals changed", flush=True)
        sys.stdin.read()
    """
    proc = start(code, master.endpoint, tmp_path)
    ms = master.wait_for(lambda ms: len([m for m in ms if m.kind is Kind.HEARTBEAT]) >= 3)
    beats = [m for m in ms if m.kind is Kind.HEARTBEAT]
    assert {(m.run, m.shard, m.attempt) for m in beats} == {("r1", "s1", 1)}
    assert beats[-1].done == 3
    assert all(m.rss is not None and m.rss > 1 << 20 for m in beats)
    assert [m.seq for m in beats] == sorted({m.seq for m in beats})
    rc, out, err = finish(proc)  # closes stdin, so the shard exits
    assert (rc, out.strip(), err) == (0, "signals untouched", "")
    end = master.msgs(Kind.END)
    assert len(end) == 1 and end[0].done == 3


def test_final_count_of_two_million_advances_is_recorded(
    master: FakeMaster, tmp_path: Path
) -> None:
    code = """
        import shards
        for _ in range(2_000_000):
            shards.advance()
    """
    t0 = time.monotonic()
    proc = start(code, master.endpoint, tmp_path, ORCH_HEARTBEAT_INTERVAL="1.0")
    rc, _, err = finish(proc)
    elapsed_s = time.monotonic() - t0
    assert (rc, err) == (0, "")
    ends = master.msgs(Kind.END)
    assert len(ends) == 1 and ends[0].done == 2_000_000
    # Coalescing: <= one progress beat per 0.2 s + one periodic beat per 1 s, plus END.
    assert len(master.msgs()) <= 3 + elapsed_s * (1 / 0.2 + 1 / 1.0)


def test_progress_beats_flow_and_stay_coalesced_while_the_shard_is_busy(
    master: FakeMaster, tmp_path: Path
) -> None:
    code = """
        import time, shards
        advance = shards.advance
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            for _ in range(10_000):
                advance()
    """
    t0 = time.monotonic()
    rc, _, err = finish(start(code, master.endpoint, tmp_path, ORCH_HEARTBEAT_INTERVAL="1.0"))
    elapsed_s = time.monotonic() - t0
    assert (rc, err) == (0, "")
    beats = [m.done for m in master.msgs(Kind.HEARTBEAT) if m.done is not None]
    assert len(beats) >= 4  # progress is reported during the loop, not only at the end
    assert beats == sorted(beats) and beats[-1] > 0
    assert len(master.msgs()) <= 3 + elapsed_s * (1 / 0.2 + 1 / 1.0)


def test_resumed_attempt_continues_from_its_checkpoint(master: FakeMaster, tmp_path: Path) -> None:
    code = """
        import orjson, shards
        i = shards.info()
        print(orjson.dumps([shards.last_checkpoint(), i.checkpoint_done, i.attempt,
                            i.index, i.count, i.record, i.run_id, i.shard_id]).decode())
        shards.advance(10)
    """
    env = {"ORCH_ATTEMPT": "2", "ORCH_CHECKPOINT": '{"page": 3}', "ORCH_CHECKPOINT_DONE": "500"}
    rc, out, err = finish(start(code, master.endpoint, tmp_path, **env))
    assert (rc, err) == (0, "")
    assert orjson.loads(out) == [{"page": 3}, 500, 2, 3, 8, {"merchant": "acme"}, "r1", "s1"]
    assert master.msgs()[0].done == 500
    assert [(m.attempt, m.done) for m in master.msgs(Kind.END)] == [(2, 510)]


def test_track_counts_each_item_handed_out_exactly(master: FakeMaster, tmp_path: Path) -> None:
    code = """
        import shards
        for i in shards.track(range(10)):
            if i == 4:
                shards.checkpoint({"next": i + 1})    # covers the item being processed
        for i in shards.track(range(100)):
            if i == 41:
                break
        for i in shards.track(iter(range(7))):      # no len(): total unchanged
            pass
    """
    rc, _, err = finish(start(code, master.endpoint, tmp_path))
    assert (rc, err) == (0, "")
    [cp] = master.msgs(Kind.CHECKPOINT)
    assert (cp.checkpoint, cp.done, cp.total) == ({"next": 5}, 5, 10)
    [end] = master.msgs(Kind.END)
    assert (end.done, end.total) == (10 + 42 + 7, 10 + 100)


# -- checkpoints ----------------------------------------------------------------------


def test_checkpoint_returns_after_ack_with_progress(master: FakeMaster, tmp_path: Path) -> None:
    code = """
        import orjson, shards
        shards.progress(40, total=100)
        shards.checkpoint({"page": 7, "ids": (1, 2)})
        print(orjson.dumps([shards.last_checkpoint(), shards.info().checkpoint_done]).decode())
    """
    rc, out, err = finish(start(code, master.endpoint, tmp_path))
    assert (rc, err) == (0, "")
    assert orjson.loads(out) == [{"page": 7, "ids": [1, 2]}, 40]
    [cp] = master.msgs(Kind.CHECKPOINT)
    assert (cp.checkpoint, cp.has_checkpoint, cp.done, cp.total) == (
        {"page": 7, "ids": [1, 2]},
        True,
        40,
        100,
    )


def test_checkpoint_nack_raises_checkpoint_error(master: FakeMaster, tmp_path: Path) -> None:
    master.checkpoint_reply = "nack"
    code = """
        import shards
        try:
            shards.checkpoint({"page": 1})
        except shards.CheckpointError as exc:
            print("refused:", exc, shards.last_checkpoint())
    """
    rc, out, err = finish(start(code, master.endpoint, tmp_path))
    assert (rc, out.strip(), err) == (0, "refused: stale attempt 1 None", "")


@pytest.mark.parametrize("policy", ["ignore", "wrong-seq"])
def test_checkpoint_without_matching_ack_times_out(
    master: FakeMaster, tmp_path: Path, policy: str
) -> None:
    master.checkpoint_reply = policy
    code = """
        import time, shards
        t0 = time.monotonic()
        try:
            shards.checkpoint({"page": 1}, timeout_s=0.5)
        except shards.CheckpointError as exc:
            print(f"{exc}|{time.monotonic() - t0:.2f}")
    """
    rc, out, err = finish(start(code, master.endpoint, tmp_path))
    assert (rc, err) == (0, "")
    text, waited = out.strip().split("|")
    assert text == "master did not acknowledge the checkpoint within 0.5s"
    assert 0.45 <= float(waited) < 3.0


def test_outside_orch_everything_is_a_harmless_no_op(tmp_path: Path) -> None:
    code = """
        import orjson, shards
        shards.advance(5)
        shards.progress(7, total=9)
        rows = list(shards.track(["a", "b"]))
        shards.checkpoint({"k": 1})
        try:
            shards.checkpoint({"bad": {1, 2}})
        except TypeError as exc:
            print(exc)
        i = shards.info()
        print(orjson.dumps([rows, shards.last_checkpoint(), i.run_id, i.shard_id, i.index,
                            i.count, i.attempt, i.record]).decode())
    """
    rc, out, err = finish(start(code, None, tmp_path))
    assert (rc, err) == (0, "")
    first, second = out.strip().splitlines()
    assert first.startswith("checkpoint state must be JSON-serialisable")
    assert orjson.loads(second) == [["a", "b"], {"k": 1}, "", "0", 0, 1, 1, {}]


# -- one connection per attempt, exit, master death ----------------------------------------


def test_forked_and_spawned_children_never_use_the_attempts_connection(
    master: FakeMaster, tmp_path: Path
) -> None:
    code = """
        import os, subprocess, sys, shards
        shards.advance(1)
        pid = os.fork()
        if pid == 0:
            shards.advance(1000)
            shards.checkpoint({"child": 1}, timeout_s=0.2)   # local only: no master answer
            sys.exit(0)                                      # runs atexit in the child
        _, status = os.waitpid(pid, 0)
        subprocess.run([sys.executable, "-c", "import shards; shards.advance(5)"], check=True)
        shards.advance(1)
        print(os.waitstatus_to_exitcode(status))
    """
    rc, out, err = finish(start(code, master.endpoint, tmp_path))
    assert (rc, out.strip(), err) == (0, "0", "")
    assert len(master.identities()) == 1
    assert master.msgs(Kind.CHECKPOINT) == []
    assert [m.done for m in master.msgs(Kind.END)] == [2]


def test_exit_is_prompt_when_no_master_answers(tmp_path: Path) -> None:
    code = """
        import shards
        shards.advance(3)
    """
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    t0 = time.monotonic()
    rc, _, err = finish(start(code, endpoint, tmp_path))
    assert (rc, err) == (0, "")
    assert time.monotonic() - t0 < 4.0  # END waits 2 s for its ACK, then LINGER 0


def test_master_death_terminates_the_process_group(master: FakeMaster, tmp_path: Path) -> None:
    fake_master = subprocess.Popen(["sleep", "60"], start_new_session=True)
    code = """
        import signal, subprocess, sys, shards
        child = subprocess.Popen(["sleep", "60"])           # same process group
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # a shard that ignores SIGTERM
        shards.advance(1)
        print(child.pid, flush=True)
        while True:
            shards.advance()
    """
    proc = start(code, master.endpoint, tmp_path, ORCH_MASTER_PID=str(fake_master.pid))
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        master.wait_for(kinds(Kind.HEARTBEAT))
        fake_master.kill()
        fake_master.wait()
        killed_at = time.monotonic()

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        poll_until(lambda: gone(grandchild), timeout_s=3.0)  # SIGTERM reached the group
        rc, _, _ = finish(proc, timeout_s=10.0)
        assert rc == 75  # SIGTERM was ignored, so the SDK exited 5 s later
        assert 4.5 <= time.monotonic() - killed_at < 8.0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- runner ---------------------------------------------------------------------------

TASK = """
import shards

NOT_CALLABLE = 3


def run(info):
    print(info.shard_id, info.record["merchant"], info.index)
    shards.advance(3)


def boom(info):
    raise ValueError("boom")
"""


def test_runner_calls_the_function_with_info(master: FakeMaster, tmp_path: Path) -> None:
    (tmp_path / "mytask.py").write_text(TASK)
    proc = start("", master.endpoint, tmp_path, "-m", "shards.runner", "mytask:run")
    rc, out, err = finish(proc)
    assert (rc, out.strip(), err) == (0, "s1 acme 3", "")
    assert [m.done for m in master.msgs(Kind.END)] == [3]


def test_runner_exits_1_with_traceback_when_the_task_raises(tmp_path: Path) -> None:
    (tmp_path / "mytask.py").write_text(TASK)
    rc, _, err = finish(start("", None, tmp_path, "-m", "shards.runner", "mytask:boom"))
    assert rc == 1
    assert "Traceback" in err and err.strip().endswith("ValueError: boom")


def test_runner_runs_a_dill_pickled_closure(tmp_path: Path) -> None:
    pkl = tmp_path / "task.pkl"
    maker = f"""
        import dill
        def make(n):
            return lambda info: print(n + 1, info.attempt)
        with open({str(pkl)!r}, "wb") as f:
            dill.dump(make(41), f)
    """
    assert finish(start(maker, None, tmp_path))[0] == 0
    rc, out, err = finish(start("", None, tmp_path, "-m", "shards.runner", f"@{pkl}"))
    assert (rc, out.strip(), err) == (0, "42 1", "")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("nosuchmod:run", "No module named 'nosuchmod'"),
        ("mytask:nope", "'mytask' has no attribute 'nope'"),
        ("mytask:NOT_CALLABLE", "'NOT_CALLABLE' is not callable (int)"),
        ("mytask", "expected 'pkg.module:function' or '@/path/to/task.pkl'"),
        ("@/nonexistent/task.pkl", "No such file or directory"),
    ],
)
def test_runner_rejects_a_bad_target_in_one_line(tmp_path: Path, target: str, reason: str) -> None:
    (tmp_path / "mytask.py").write_text(TASK)
    rc, out, err = finish(start("", None, tmp_path, "-m", "shards.runner", target))
    assert (rc, out) == (2, "")
    assert err == f"orch: cannot load task {target!r}: {reason}\n"
