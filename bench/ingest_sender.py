"""Traffic for the ingest benchmark: many DEALER sockets sending heartbeats.

    python bench/ingest_sender.py ENDPOINT RUN_ID ATTEMPT AMOUNT MODE SHARD...

One DEALER socket per shard id, each sending valid protocol heartbeats
(``shards.protocol.encode``) for the shard's current ATTEMPT. MODE is
``flood`` (send AMOUNT messages round-robin over the sockets as fast as
possible; every ``STALE_EVERY``-th message carries a stale attempt number,
which the master counts in ``dropped.stale``, so the number of processed
messages can be read from its status), ``fill`` (the same messages, queued
on command: once every socket is connected it prints ``connected`` and waits
for a line on stdin, then queues them all, prints ``queued`` and delivers
them; the caller stops the receiver meanwhile, so that its drain is timed
alone) or ``paced`` (for AMOUNT seconds, each socket sends one heartbeat a
second, spread evenly). Prints JSON last: messages sent, stale ones among
them, and the wall time sending started.
"""

from __future__ import annotations

import sys
import time

import orjson
import zmq

from shards import protocol as p

STALE_EVERY = 100


def main(argv: list[str]) -> None:
    endpoint, run_id, attempt, amount, mode, *ids = argv
    ctx = zmq.Context()
    socks = []
    for _ in ids:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0 if mode == "paced" else 60_000)  # deliver every message
        # fill: a socket's whole share fits its queue, so queuing never waits for the receiver
        s.setsockopt(zmq.SNDHWM, int(amount) // len(ids) + 100 if mode == "fill" else 200)
        s.connect(endpoint)
        socks.append(s)
    a = int(attempt)
    frames = [p.encode(p.Message(p.Kind.HEARTBEAT, run_id, sid, a, 1, 1, 100, 1 << 25))
              for sid in ids]
    stale = [p.encode(p.Message(p.Kind.HEARTBEAT, run_id, sid, a + 1000, 1, 1, 100))
             for sid in ids]
    pairs = list(zip(socks, frames, stale, strict=True))
    sent = n_stale = 0
    time.sleep(0.5)  # let the connections settle
    if mode == "fill":
        print("connected", flush=True)
        sys.stdin.readline()
    t_start = time.time()
    if mode in ("flood", "fill"):
        quota = int(amount)
        while sent < quota:
            for sock, frame, old in pairs[: quota - sent]:
                sent += 1
                if sent % STALE_EVERY == 0:
                    n_stale += 1
                    sock.send(old)
                else:
                    sock.send(frame)
    else:
        t_end = time.monotonic() + float(amount)
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
    if mode == "fill":
        print("queued", flush=True)
    for s in socks:
        s.close()
    ctx.term()  # returns once every queued message is delivered (LINGER)
    print(orjson.dumps({"sent": sent, "stale": n_stale, "t0": t_start}).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
