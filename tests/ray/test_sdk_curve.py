"""The SDK over TCP with CURVE (the ray backend's channel), against a real CURVE server.

Needs no Ray. The test plays the master with a ROUTER that is a CURVE server;
the shard is a real subprocess in its own session with the ORCH_CURVE_*
variables. Checked: the SDK connects with the keys and reports, and an
attempt refused as stale (a newer attempt of its shard runs elsewhere) stops
its whole process group: fencing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from shards import protocol as p

REPO = Path(__file__).resolve().parents[2]


class CurveMaster:
    """A CURVE-server ROUTER on a thread: records messages, NACKs checkpoints as stale."""

    def __init__(self) -> None:
        self.server_public, server_secret = zmq.curve_keypair()
        self.client = zmq.curve_keypair()
        self.messages: list[p.Message] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self._sock.poll(50):
                continue
            ident, frame = self._sock.recv_multipart()
            msg = p.decode(frame)
            self.messages.append(msg)
            if msg.kind is p.Kind.CHECKPOINT:
                text = "stale attempt: a newer one runs"
                reply = p.Message(
                    p.Kind.NACK, msg.run, msg.shard, msg.attempt, msg.seq, message=text
                )
                self._sock.send_multipart([ident, p.encode(reply)])

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env["PYTHONPATH"] = str(REPO)
        env.update(
            ORCH_RUN_ID="r1", ORCH_SHARD_ID="s1", ORCH_ATTEMPT="1", ORCH_ENDPOINT=self.endpoint,
            ORCH_HEARTBEAT_INTERVAL="0.2", ORCH_CURVE_SERVER=self.server_public.decode(),
            ORCH_CURVE_PUBLIC=self.client[0].decode(), ORCH_CURVE_SECRET=self.client[1].decode(),
        )  # fmt: skip
        return env

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture
def master() -> Iterator[CurveMaster]:
    fake = CurveMaster()
    yield fake
    fake.close()


SHARD = """
import subprocess, sys, time
import shards
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
print(child.pid, flush=True)
shards.progress(3, 10)
if sys.argv[1] == "checkpoint":
    try:
        shards.checkpoint({"at": 3}, timeout_s=30)
    except shards.CheckpointError as exc:
        print("refused", exc, flush=True)
time.sleep(60)  # allowed-sleep: the shard's work; the test ends it
"""


def start(master: CurveMaster, mode: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARD, mode], env=master.env(), stdout=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    return proc, child


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # allowed-sleep: poll interval
    return False


def test_sdk_reports_over_curve(master: CurveMaster) -> None:
    proc, child = start(master, "beat")
    try:
        deadline = time.monotonic() + 15
        while not any(m.done == 3 for m in master.messages) and time.monotonic() < deadline:
            time.sleep(0.05)  # allowed-sleep: poll interval
        assert any(m.done == 3 and m.total == 10 for m in master.messages), master.messages
        assert proc.poll() is None  # heard, not refused: it keeps working
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def test_attempt_refused_as_stale_stops_its_whole_group(master: CurveMaster) -> None:
    proc, child = start(master, "checkpoint")
    try:
        assert proc.wait(20) != 0  # SIGTERM to its own group, or exit 75 after the grace
        assert wait_gone(child, 10), "the shard's child outlived the fencing"
        assert any(m.kind is p.Kind.CHECKPOINT for m in master.messages)
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
