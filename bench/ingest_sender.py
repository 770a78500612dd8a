"""Traffic for the ingest benchmark: many DEALER sockets sending heartbeats.

    python bench/ingest_sender.py ENDPOINT RUN_ID ATTEMPT SECONDS MODE SHARD...

One DEALER socket per shard id, each sending valid protocol heartbeats
(``shards.protocol.encode``) for the shard's current ATTEMPT. MODE is
``flood`` (send round-robin over the sockets as fast as possible; every
``STALE_EVERY``-th message carries a stale attempt number, which the master
counts in ``dropped.stale``, so the count of processed messages can be read
from its status) or ``paced`` (each socket sends one heartbeat a second,
spread evenly). Prints the number of messages sent as JSON.
"""

from __future__ import annotations

import sys
import time

import orjson
import zmq

from shards import protocol as p

STALE_EVERY = 100


def main(argv: list[str]) -> None:
    endpoint, run_id, attempt, seconds, mode, *ids = argv
    ctx = zmq.Context()
    socks = []
    for _ in ids:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 200)
        s.connect(endpoint)
        socks.append(s)
    a = int(attempt)
    frames = [p.encode(p.Message(p.Kind.HEARTBEAT, run_id, sid, a, 1, 1, 100, 1 << 25))
              for sid in ids]
    stale = [p.encode(p.Message(p.Kind.HEARTBEAT, run_id, sid, a + 1000, 1, 1, 100))
             for sid in ids]
    pairs = list(zip(socks, frames, stale, strict=True))
    sent = 0
    time.sleep(0.3)  # let the connections settle
    t_end = time.monotonic() + float(seconds)
    if mode == "flood":
        k = 0
        while time.monotonic() < t_end:
            for sock, frame, old in pairs:
                k += 1
                sock.send(old if k % STALE_EVERY == 0 else frame)
            sent += len(pairs)
    else:
        gap = 1.0 / len(pairs)
        nxt = time.monotonic()
        while time.monotonic() < t_end:
            for sock, frame, _ in pairs:
                sock.send(frame, zmq.NOBLOCK)
                sent += 1
                nxt += gap
                delay = nxt - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    print(orjson.dumps({"sent": sent}).decode(), flush=True)
    for s in socks:
        s.close(0)
    ctx.term()


if __name__ == "__main__":
    main(sys.argv[1:])
