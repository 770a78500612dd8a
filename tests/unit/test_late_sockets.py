"""The run's ZeroMQ sockets are bound after the first attempts start (assemble.LateSockets).

Real ZeroMQ sockets on ipc:// paths in tmp_path, a real ``Loop``, no processes:
what a shard or a client sends before the bind must arrive once it is bound,
and ``orch run``'s path to its first spawn must not import zmq at all.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from orchestrator.assemble import LateSockets
from orchestrator.loop import Loop
from shards import protocol as p

RUN = "r1"
DEADLINE_S = 10.0


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[Loop, LateSockets, Path]]:
    assert len(str(tmp_path / "control.sock")) < 100, "ipc paths are limited to ~107 bytes"
    loop = Loop()
    late = LateSockets(
        loop,
        run_id=RUN,
        hb_path=str(tmp_path / "hb.sock"),
        control_path=str(tmp_path / "control.sock"),
        events_path=str(tmp_path / "events.sock"),
    )
    yield loop, late, tmp_path
    late.channel.close()
    late.control.close()
    late.events.close()
    loop.close()


def _run_until(loop: Loop, done: Any) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not done() and time.monotonic() < deadline:
        loop.run_once(0.05)
    return bool(done())


def test_nothing_is_bound_before_open_and_every_socket_after(
    sockets: tuple[Loop, LateSockets, Path],
) -> None:
    loop, late, tmp = sockets
    names = ("hb.sock", "control.sock", "events.sock")
    assert late.channel.endpoint == f"ipc://{tmp / 'hb.sock'}"
    assert late.control.endpoint == f"ipc://{tmp / 'control.sock'}"
    assert not any((tmp / n).exists() for n in names)
    late.events.publish({"shard": "0", "state": "running"})  # to nobody, and no error
    assert late.channel.received == 0 and late.channel.garbage == 0
    late.open()
    for name in names:
        st = (tmp / name).lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 == 0, name
    late.open()  # once only: a second call binds nothing again


def test_heartbeats_sent_before_the_bind_all_arrive(
    sockets: tuple[Loop, LateSockets, Path],
) -> None:
    loop, late, _ = sockets
    beats: list[tuple[str, int, int | None]] = []
    messages: list[p.Message] = []
    late.channel.bind(
        lambda identity, msg: messages.append(msg),
        lambda identity, hb, now: beats.append((hb[0], hb[1], hb[2])),
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(late.channel.endpoint)  # as the SDK does, before the master binds
        for i in range(50):
            dealer.send(p.encode(p.Message(p.Kind.HEARTBEAT, RUN, "s1", 1, done=i, total=50)))
        cp = p.Message(p.Kind.CHECKPOINT, RUN, "s1", 1, seq=1, checkpoint={"i": 49})
        dealer.send(p.encode(cp))
        late.open()
        assert _run_until(loop, lambda: len(beats) == 50 and len(messages) == 1)
    finally:
        dealer.close(0)
    assert beats == [("s1", 1, i) for i in range(50)]
    assert messages[0].kind is p.Kind.CHECKPOINT and messages[0].checkpoint == {"i": 49}
    assert late.channel.received == 51 and late.channel.garbage == 0


class _Master:
    run_id = RUN

    def shard_index(self, shard_id: str) -> int | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"run": RUN}

    def stop_all(self) -> None: ...
    def stop_shard(self, idx: int) -> None: ...
    def restart_shard(self, idx: int) -> None: ...

    def restart_all(self, rolling: int | None = None) -> int:
        return 0

    def scale(self, jobs: int) -> None: ...


def test_a_control_request_sent_before_the_bind_is_answered(
    sockets: tuple[Loop, LateSockets, Path],
) -> None:
    from orchestrator.control import request

    loop, late, _ = sockets
    late.control.bind(_Master())
    replies: list[dict[str, Any]] = []
    client = threading.Thread(
        target=lambda: replies.append(request(late.control.endpoint, "ping", timeout_s=DEADLINE_S))
    )
    client.start()
    try:
        late.open()
        assert _run_until(loop, lambda: bool(replies))
    finally:
        client.join(DEADLINE_S)
    assert replies[0]["ok"] is True and replies[0]["pid"] == os.getpid()
    assert replies[0]["run"] == RUN


def test_a_run_that_ends_before_the_bind_closes_cleanly(
    sockets: tuple[Loop, LateSockets, Path],
) -> None:
    _, late, tmp = sockets
    late.channel.close()
    late.control.close()
    late.events.close()
    assert not (tmp / "hb.sock").exists()


def test_orch_run_reaches_its_first_spawn_without_importing_zmq() -> None:
    """What ``orch run`` imports before its master's first batch (cli, launch, start,
    assemble, the plain view): zmq, the control server and the summary come later, and
    the standard library modules only some runs need are imported where they are used."""
    code = (
        "import sys\n"
        "import orchestrator.cli, orchestrator.launch, orchestrator.start\n"
        "import orchestrator.assemble, orchestrator.views.live\n"
        "heavy = ('zmq', 'orchestrator.channel', 'orchestrator.control',\n"
        "         'orchestrator.views.summary', 'orchestrator.opsconfig', 'subprocess',\n"
        "         'socket', 'tomllib', 'fractions', 'tempfile', 'difflib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_sockets_are_bound_in_the_loops_second_pass(
    sockets: tuple[Loop, LateSockets, Path],
) -> None:
    """build_master queues open_soon(): the first pass commits the first batch (what
    ``orch status`` reads), the second binds."""
    loop, late, tmp = sockets
    loop.call_when_idle(late.open_soon)
    loop.run_once(0)
    assert not late.opened and not (tmp / "hb.sock").exists()
    loop.run_once(0)
    assert late.opened and (tmp / "hb.sock").exists()
