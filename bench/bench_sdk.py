"""Cost of a progress call: ``shards.advance()`` against tqdm's ``update()``.

    python bench/bench_sdk.py [--calls 10000000] [--repeats 5] [--json]

Each figure is ns per call over ``--calls`` calls, median of ``--repeats``
loops, with the call bound to a local name (the fastest way either library
is used). The SDK is measured in fresh child processes, once inside orch
(connected to a live ROUTER played by this script, which acknowledges END
and counts every message) and once outside orch (no ORCH_ENDPOINT: the
no-op figure). tqdm runs with ``file=io.StringIO()``, ``disable=False`` and
its default ``mininterval``. "messages" is how many the SDK sent during one
loop of ``--calls`` calls (median), which coalescing bounds by time, not by
calls. The empty loop is shown so the call cost can be read net of it.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from shards import protocol as p

REPO = Path(__file__).resolve().parents[1]


def _loop_ns(fn: Any, calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls


def _empty_ns(calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        pass
    return (time.perf_counter_ns() - t0) / calls


def child(calls: int, repeats: int) -> None:
    """Measure advance() in this fresh process; print JSON on stdout."""
    import shards

    advance = shards.advance
    advance(0)  # first use reads the environment (and connects inside orch)
    link = shards._link  # private: the bench reads the SDK's sent-message counter
    ns, sent, secs = [], [], []
    for _ in range(repeats):
        before = link.sent if link is not None else 0
        t0 = time.perf_counter()
        ns.append(_loop_ns(advance, calls))
        secs.append(time.perf_counter() - t0)
        sent.append((link.sent if link is not None else 0) - before)
    done = shards._state.done
    print(orjson.dumps({"ns": ns, "sent": sent, "secs": secs, "done": done}).decode())


class Router:
    """The master's side: a ROUTER that acknowledges END and counts messages."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.received = 0
        self._stop = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self._sock.poll(100):
                continue
            ident, frame = self._sock.recv_multipart()
            msg = p.decode(frame)
            self.received += 1
            if msg.kind in (p.Kind.CHECKPOINT, p.Kind.END):
                ack = p.Message(p.Kind.ACK, msg.run, msg.shard, msg.attempt, msg.seq)
                self._sock.send_multipart([ident, p.encode(ack)])

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


def run_child(calls: int, repeats: int, endpoint: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = str(REPO)
    if endpoint is not None:
        env.update(
            {
                p.ENV_RUN_ID: "bench",
                p.ENV_SHARD_ID: "s0",
                p.ENV_SHARD_INDEX: "0",
                p.ENV_SHARD_COUNT: "1",
                p.ENV_ATTEMPT: "1",
                p.ENV_SHARD: "{}",
                p.ENV_ENDPOINT: endpoint,
                p.ENV_HEARTBEAT_INTERVAL: "1.0",
                p.ENV_MASTER_PID: str(os.getpid()),
            }
        )
    argv = [sys.executable, __file__, "--child", "--calls", str(calls), "--repeats", str(repeats)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = orjson.loads(out)
    return result


def tqdm_ns(calls: int, repeats: int) -> list[float]:
    from tqdm import tqdm

    runs = []
    for _ in range(repeats):
        bar = tqdm(total=calls * repeats, file=io.StringIO(), disable=False)
        runs.append(_loop_ns(bar.update, calls))
        bar.close()
    return runs


def decode_us(n: int = 200_000) -> float:
    msg = p.Message(
        p.Kind.HEARTBEAT, "20240601-1200-ab12", "merchant-42", 1, 17, 1200, 5000, 1 << 25
    )
    frame = p.encode(msg)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        p.decode(frame)
    return (time.perf_counter_ns() - t0) / n / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.calls, args.repeats)
        return
    calls, repeats = args.calls, args.repeats
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        endpoint = f"ipc://{tmp}/hb.sock"
        router = Router(endpoint)
        t0 = time.perf_counter()
        live = run_child(calls, repeats, endpoint)
        live_s = time.perf_counter() - t0
        router.close()
    noop = run_child(calls, repeats, None)
    tq = tqdm_ns(calls, repeats)
    empty = [_empty_ns(calls) for _ in range(repeats)]
    med = statistics.median
    figures = {
        "calls": calls,
        "repeats": repeats,
        "advance_ns": med(live["ns"]),
        "advance_noop_ns": med(noop["ns"]),
        "tqdm_update_ns": med(tq),
        "empty_loop_ns": med(empty),
        "ratio_tqdm_over_advance": med(tq) / med(live["ns"]),
        "messages_per_loop": med(live["sent"]),
        "loop_s": med(live["secs"]),
        "messages_received_by_master": router.received,
        "child_lifetime_s": live_s,
        "final_done": live["done"],
        "decode_heartbeat_us": decode_us(),
    }
    if args.json:
        print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
        return
    f = figures
    print(f"progress call cost, {calls:,} calls, median of {repeats} (ns/call, incl. loop)")
    print(f"  {'shards.advance()  inside orch':<34}{f['advance_ns']:>9.1f}")
    print(f"  {'shards.advance()  outside orch':<34}{f['advance_noop_ns']:>9.1f}")
    print(f"  {'tqdm.update()     (StringIO)':<34}{f['tqdm_update_ns']:>9.1f}")
    print(f"  {'empty for-loop    (baseline)':<34}{f['empty_loop_ns']:>9.1f}")
    print(f"  {'ratio tqdm / advance':<34}{f['ratio_tqdm_over_advance']:>8.1f}x")
    print(
        f"  {'messages sent per loop':<34}{f['messages_per_loop']:>9}"
        f"   (loop {f['loop_s']:.2f} s; master received {f['messages_received_by_master']}"
        f" in {f['child_lifetime_s']:.1f} s, final done {f['final_done']:,})"
    )
    print(f"  {'protocol.decode(heartbeat)':<34}{f['decode_heartbeat_us']:>9.2f} µs")


if __name__ == "__main__":
    main()
