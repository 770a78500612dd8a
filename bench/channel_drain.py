"""Process time per heartbeat of orch's real ``Channel.drain`` (the Python side of ingest).

``python bench/channel_drain.py``: 50 DEALER peers queue 900 heartbeats each on
the channel's ipc socket, then the channel drains them into a handler that
only counts; prints the process time per message, min of 7 rounds. Process
time, so a loaded machine distorts it far less than the msg/s ingest row.
Run it with ``PYTHONPATH`` set to another checkout to compare two versions.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import orjson
import zmq

from orchestrator.channel import Channel
from orchestrator.loop import Loop

PEERS, PER_PEER, ROUNDS = 50, 900, 7


def main() -> None:
    loop = Loop()
    ch = Channel(loop, os.path.join(tempfile.mkdtemp(), "hb.sock"), "run1")
    count = [0]

    def handler(*_: Any) -> None:
        count[0] += 1

    ch.bind(handler, handler)
    ctx = zmq.Context.instance()
    peers = []
    for _ in range(PEERS):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(ch.endpoint)
        peers.append(sock)
    frames = [
        orjson.dumps(
            {"v": 1, "k": "hb", "run": "run1", "sh": f"s{i}", "a": 1, "seq": 7, "done": 123}
        )
        for i in range(PEERS)
    ]
    per_msg: list[float] = []
    for _ in range(ROUNDS):
        for sock, frame in zip(peers, frames, strict=True):
            for _ in range(PER_PEER):
                sock.send(frame)
        want = count[0] + PEERS * PER_PEER
        deadline = time.time() + 30
        spent = 0.0
        while count[0] < want and time.time() < deadline:
            t0 = time.process_time()
            ch.drain()
            spent += time.process_time() - t0
        per_msg.append(spent / (PEERS * PER_PEER) * 1e6)
    shown = ", ".join(f"{x:.2f}" for x in per_msg)
    print(f"{min(per_msg):.2f} us/msg (min of {ROUNDS}: {shown}) garbage={ch.garbage}")


if __name__ == "__main__":
    main()
