"""Progress (metric 7): the SDK's ``advance()`` cost and the master's message ingest.

advance(): bench/bench_sdk.py's measurement (a fresh child process connected
to a live ROUTER, ``--calls`` calls per loop) against tqdm's ``update()``,
alternating per round.

Ingest: a live detached run of N ``sleep`` shards; sender processes open
one DEALER socket per shard and send valid heartbeats for the shards'
current attempts as fast as they can (bench/ingest_sender.py). The master's
control socket reports ``dropped.stale``; 1 message in 100 is sent with a
stale attempt number, so processed ≈ 100 × stale (the master exposes no
"received" counter over the control socket yet; when it does, it is used).
The limit is a bare pyzmq ROUTER loop (recv_multipart only) receiving the
same traffic from the same senders.
"""

from __future__ import annotations

import os
import subprocess
import time

import orjson

from bench.common import PY, REPO, SLEEP, Config, Row, Skip, cell, cpu_ns, launch, log, stop
from bench.peers import Fleet, Spec, start

SENDER = str(REPO / "bench" / "ingest_sender.py")
STALE_EVERY = 100
SENDER_PROCS = 2

_BARE = """
import sys, time, zmq
ep, warm, window = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.RCVHWM, 100000)
s.setsockopt(zmq.LINGER, 0); s.bind(ep)
s.recv_multipart()
t_start = time.monotonic() + warm; t_end = t_start + window
recv = s.recv_multipart; n = 0; counting = False
while True:
    recv()
    if counting:
        n += 1
        if n % 1024 == 0 and time.monotonic() >= t_end:
            break
    elif time.monotonic() >= t_start:
        counting, n, t0 = True, 0, time.monotonic()
print(n / (time.monotonic() - t0), flush=True)
"""


def advance(cfg: Config) -> list[Row]:
    from bench import bench_sdk

    calls = 1_000_000 if cfg.quick else 10_000_000
    work = cfg.sub("sdk")
    live: list[float] = []
    tq: list[float] = []
    sent: list[float] = []
    tq_text = None
    for _ in range(cfg.repeat):
        router = bench_sdk.Router(f"ipc://{work}/hb.sock")
        try:
            out = bench_sdk.run_child(calls, 1, f"ipc://{work}/hb.sock")
        finally:
            router.close()
        live += out["ns"]
        sent += out["sent"]
        try:
            tq += bench_sdk.tqdm_ns(calls, 1)
        except ImportError:
            tq_text = "skipped (not installed)"
    return [Row(key="advance_ns", family="progress", metric="SDK advance() per call",
                unit="ns", better="lower", orch=cell(live),
                peers={"tqdm": cell(text=tq_text) if tq_text else cell(tq)}, target=300,
                note=f"{calls:,} calls per loop inside orch's protocol, incl. the for-loop; "
                     f"messages sent per loop: {int(max(sent or [0]))}; tqdm: update() with "
                     "file=StringIO")]


def _senders(endpoint: str, run_id: str, ids: list[str], seconds: float,
             mode: str) -> list[subprocess.Popen[bytes]]:
    per = -(-len(ids) // SENDER_PROCS)
    return [launch([PY, SENDER, endpoint, run_id, "1", str(seconds), mode, *ids[i:i + per]],
                   stdout=subprocess.PIPE)
            for i in range(0, len(ids), per)]


def _finish(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> int:
    sent = 0
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
            sent += orjson.loads(out or b'{"sent": 0}')["sent"]
        except (subprocess.TimeoutExpired, orjson.JSONDecodeError):
            pass
        stop(p)
    return sent


def _processed(control: str) -> tuple[float, float]:
    from orchestrator.control import request

    t0 = time.perf_counter()
    st = request(control, "status", timeout_s=20)
    t = (t0 + time.perf_counter()) / 2
    if "received" in st:
        return float(st["received"]), t
    return float(st["dropped"]["stale"] * STALE_EVERY), t


def ingest(cfg: Config) -> list[Row]:
    n = 200 if cfg.quick else 1000
    window = 2.0 if cfg.quick else 5.0
    fleet = start("orch", Spec(n=n, argv=[SLEEP, "1000"], detach=True), cfg.sub("ingest"))
    orch_rates: list[float] = []
    bare_rates: list[float] = []
    cpu_pct: list[float] = []
    try:
        if fleet.wait_running(n, 120) is None:
            raise Skip(f"error: {n} shards not running")
        run, ids = _run_info(fleet)
        bare_ep = f"ipc://{fleet.workdir}/bare.sock"
        for _ in range(cfg.repeat):
            procs = _senders(run["endpoint"], run["id"], ids, window + 2.5, "flood")
            time.sleep(1.0)
            c0, t0 = _processed(run["control"])
            time.sleep(window)
            c1, t1 = _processed(run["control"])
            _finish(procs, window + 30)
            orch_rates.append((c1 - c0) / (t1 - t0))
            log(cfg, f"ingest orch: {orch_rates[-1]:,.0f} msg/s")
            time.sleep(1.5)  # the master drains what is queued
            bare = launch([PY, "-c", _BARE, bare_ep, "1.0", str(window)], stdout=subprocess.PIPE)
            time.sleep(0.3)
            procs = _senders(bare_ep, run["id"], ids, window + 2.5, "flood")
            try:
                out, _ = bare.communicate(timeout=window + 30)
                bare_rates.append(float(out))
                log(cfg, f"ingest bare ROUTER: {bare_rates[-1]:,.0f} msg/s")
            finally:
                stop(bare)
                _finish(procs, 5)
        time.sleep(2.0)
        cpu_pct = _paced_cpu(fleet, run, ids, 4.0 if cfg.quick else 10.0)
    except Skip as exc:
        return [_ingest_row(n, cell(text=str(exc)), None)]
    finally:
        fleet.close()
    rows = [_ingest_row(n, cell(orch_rates), cell(bare_rates))]
    rows.append(Row(key="hb_cpu", family="progress",
                    metric=f"Master CPU, {n:,} shards heartbeating 1/s", unit="% core",
                    better="lower", orch=cell(cpu_pct), target=3.0 if n == 1000 else None,
                    note="three sub-windows"))
    return rows


def _ingest_row(n: int, orch: object, bare: object) -> Row:
    return Row(key="ingest", family="progress",
               metric=f"Master ingest, {n:,} connections flooding heartbeats",
               unit="msg/s", better="higher", orch=orch, limit=bare,  # type: ignore[arg-type]
               limit_label="bare pyzmq ROUTER", target=100_000,
               note=f"{SENDER_PROCS} sender processes share the 2 cores with the receiver")


def _run_info(fleet: Fleet) -> tuple[dict, list[str]]:
    from orchestrator.store import Store

    path = os.path.join(fleet.home or "", "runs", fleet.run_id or "", "state.db")
    store = Store.open(path, readonly=True)
    try:
        run = store.run()
        ids = [row["id"] for row in store.shards()]
    finally:
        store.close()
    return run, ids


def _paced_cpu(fleet: Fleet, run: dict, ids: list[str], window: float) -> list[float]:
    mgr = fleet.manager()
    assert mgr is not None
    procs = _senders(run["endpoint"], run["id"], ids, window + 2.0, "paced")
    try:
        time.sleep(1.5)
        out = []
        for _ in range(3):
            c0, t0 = cpu_ns(mgr) or 0, time.perf_counter()
            time.sleep(window / 3)
            out.append(((cpu_ns(mgr) or 0) - c0) / 1e9 / (time.perf_counter() - t0) * 100)
        return out
    finally:
        _finish(procs, 10)


def progress(cfg: Config) -> list[Row]:
    return advance(cfg) + ingest(cfg)
