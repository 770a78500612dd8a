"""Prototype for the heartbeat channel's drain (orchestrator/channel.py, to apply after the
architecture change): the per-message cost of today's loop against a leaner one, on the
same queued traffic, in one process with no master around it.

    python bench/proto_ingest.py [MESSAGES]

250 DEALER sockets in the same process queue MESSAGES valid heartbeats into a ROUTER
over ``inproc://`` (no I/O thread, no kernel: the queue is complete before the drain
starts, so the figure is the Python side alone); each variant then drains the full
queue and the µs per message are printed. The handler is the same trivial one for
every variant, so only the channel's own work differs.
"""

from __future__ import annotations

import os
import sys
import time

import orjson
import zmq

from shards import protocol as p
from shards.protocol import ProtocolError, decode

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_RCVMORE, _NOBLOCK = int(zmq.RCVMORE), int(zmq.NOBLOCK)



def today(sock: zmq.Socket, handle, run_id: str) -> int:  # type: ignore[no-untyped-def]
    """orchestrator/channel.py Channel.drain as of 25b9a50 (BATCH ignored)."""
    recv, get, n = sock.recv, sock.getsockopt, 0
    while True:
        if not int(get(_EVENTS)) & _POLLIN:
            return n
        try:
            identity = recv(_NOBLOCK)
            if not get(_RCVMORE):
                continue
            frame = recv(_NOBLOCK)
            if get(_RCVMORE):
                while get(_RCVMORE):
                    recv(_NOBLOCK)
                continue
        except zmq.Again:
            return n
        try:
            msg = decode(frame)
        except ProtocolError:
            continue
        if msg.run != run_id:
            continue
        n += 1
        handle(identity, msg)


def heartbeat_fields(frame: bytes, run_id: str) -> tuple[str, int, int | None, int | None] | None:
    """The fast path: a valid heartbeat of this run as (shard, attempt, done, total), or None
    (then the full ``decode`` handles it: any other kind, or a defect to count)."""
    try:
        d = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if type(d) is not dict or d.get("k") != "hb" or d.get("v") != 1 or d.get("run") != run_id:
        return None
    shard, attempt = d.get("sh"), d.get("a")
    done, total = d.get("done"), d.get("total")
    if (type(shard) is not str or not shard or type(attempt) is not int or attempt < 1
            or (done is not None and (type(done) is not int or done < 0))
            or (total is not None and (type(total) is not int or total < 0))):
        return None
    return shard, attempt, done, total


def lean(sock: zmq.Socket, handle, run_id: str) -> int:  # type: ignore[no-untyped-def]
    """Check EVENTS once per drain, then recv until zmq.Again (one exception per drain, not
    one getsockopt per message); RCVMORE only where a frame boundary is in doubt."""
    recv, get, n = sock.recv, sock.getsockopt, 0
    if not int(get(_EVENTS)) & _POLLIN:
        return 0
    try:
        while True:
            identity = recv(_NOBLOCK)
            frame = recv(_NOBLOCK)
            if get(_RCVMORE):  # more than two frames: drop the rest
                while get(_RCVMORE):
                    recv(_NOBLOCK)
                continue
            try:
                msg = decode(frame)
            except ProtocolError:
                continue
            if msg.run != run_id:
                continue
            n += 1
            handle(identity, msg)
    except zmq.Again:
        return n


def lean_fast(sock: zmq.Socket, handle, run_id: str) -> int:  # type: ignore[no-untyped-def]
    """``lean`` plus the heartbeat fast path (no Message built for a heartbeat)."""
    recv, get, n = sock.recv, sock.getsockopt, 0
    if not int(get(_EVENTS)) & _POLLIN:
        return 0
    try:
        while True:
            identity = recv(_NOBLOCK)
            frame = recv(_NOBLOCK)
            if get(_RCVMORE):
                while get(_RCVMORE):
                    recv(_NOBLOCK)
                continue
            hb = heartbeat_fields(frame, run_id)
            if hb is not None:
                n += 1
                handle(identity, hb)
                continue
            try:
                msg = decode(frame)
            except ProtocolError:
                continue
            if msg.run == run_id:
                n += 1
                handle(identity, msg)
    except zmq.Again:
        return n


def bare(sock: zmq.Socket, handle, run_id: str) -> int:  # type: ignore[no-untyped-def]
    """The floor: recv_multipart only (the bench's limit row)."""
    recv, n = sock.recv_multipart, 0
    try:
        while True:
            recv(_NOBLOCK)
            n += 1
    except zmq.Again:
        return n


def main(argv: list[str]) -> int:
    total = int(argv[0]) if argv else 200_000
    ctx = zmq.Context()
    ep = "inproc://ingest"
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(ep)
    peers = []
    for _ in range(250):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.SNDHWM, 0)
        d.connect(ep)
        peers.append(d)
    frames = [p.encode(p.Message(p.Kind.HEARTBEAT, "RUN", f"s{i}", 1, 1, 5, 100, 1 << 25))
              for i in range(len(peers))]
    handle = lambda identity, msg: None  # noqa: E731 - the same trivial handler for all
    results: dict[str, list[float]] = {}
    for _ in range(3):
        for name, fn in (("today", today), ("lean", lean), ("lean+fast", lean_fast),
                         ("bare recv_multipart", bare)):
            for i in range(total):
                peers[i % len(peers)].send(frames[i % len(peers)])
            t0 = time.process_time()
            got = 0
            while got < total:
                got += fn(sock, handle, "RUN")
            dt = time.process_time() - t0
            results.setdefault(name, []).append(dt / total * 1e6)
    print(f"{total:,} queued heartbeats from 250 connections; µs of CPU per message "
          f"(process time: the machine is shared), min of 3 (load {os.getloadavg()[0]:.1f}):")
    base = min(results["today"])
    for name, xs in results.items():
        print(f"  {name:22s} {min(xs):6.2f} µs  ({1e6 / min(xs):>9,.0f} msg/s, "
              f"{base / min(xs):.2f}x today)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
