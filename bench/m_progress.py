"""Progress (metric 7): the SDK's ``advance()`` cost and the master's message ingest.

advance(): bench/bench_sdk.py's measurement (a fresh child process connected
to a live ROUTER, ``--calls`` calls per loop) against tqdm's ``update()``,
alternating per round.

Ingest: a live detached run of N ``sleep`` shards; sender processes open
one DEALER socket per shard and send a fixed number of valid heartbeats for
the shards' current attempts as fast as they can (bench/ingest_sender.py).
1 message in 100 carries a stale attempt number, which the master counts in
``dropped.stale`` (it exposes no "received" counter over the control socket
yet; when it does, that is used). The figure is messages / (time the last
one was processed - time sending started), the end found by polling the
control socket. The limit is a bare pyzmq ROUTER loop (recv_multipart only)
receiving the same traffic from the same senders, timed the same way.
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
ep, total = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.RCVHWM, 100000)
s.setsockopt(zmq.LINGER, 0); s.bind(ep)
recv = s.recv_multipart
for _ in range(total):
    recv()
print(time.time(), flush=True)
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


def _senders(endpoint: str, run_id: str, ids: list[str], amount: float,
             mode: str) -> list[subprocess.Popen[bytes]]:
    per = -(-len(ids) // SENDER_PROCS)
    share = str(int(amount) // SENDER_PROCS if mode == "flood" else amount)
    return [launch([PY, SENDER, endpoint, run_id, "1", share, mode, *ids[i:i + per]],
                   stdout=subprocess.PIPE)
            for i in range(0, len(ids), per)]


def _finish(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> list[dict]:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
            outs.append(orjson.loads(out))
        except (subprocess.TimeoutExpired, orjson.JSONDecodeError):
            pass
        stop(p)
    return outs


def _processed(control: str) -> float | None:
    from orchestrator.control import request
    from orchestrator.errors import MasterUnreachable

    try:
        st = request(control, "status", timeout_s=0.5)
    except MasterUnreachable:
        return None  # busy draining (the control socket starves meanwhile)
    if "received" in st:
        return float(st["received"])
    return float(st["dropped"]["stale"] * STALE_EVERY)


def _orch_round(run: dict, ids: list[str], total: int) -> float:
    base = None
    while base is None:
        base = _processed(run["control"])
    procs = _senders(run["endpoint"], run["id"], ids, total, "flood")
    deadline = time.monotonic() + 120
    done = None
    while time.monotonic() < deadline:
        got = _processed(run["control"])
        if got is not None and got - base >= total - STALE_EVERY * SENDER_PROCS:
            done = time.time()
            break
        time.sleep(0.01)
    outs = _finish(procs, 120)
    if done is None or len(outs) != len(procs):
        raise Skip("error: the master did not process every message within 120 s")
    return sum(o["sent"] for o in outs) / (done - min(o["t0"] for o in outs))


def _bare_round(endpoint: str, run_id: str, ids: list[str], total: int) -> float:
    bare = launch([PY, "-c", _BARE, endpoint, str(total)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        procs = _senders(endpoint, run_id, ids, total, "flood")
        out, _ = bare.communicate(timeout=120)
        outs = _finish(procs, 30)
        return total / (float(out) - min(o["t0"] for o in outs))
    finally:
        stop(bare)


def ingest(cfg: Config) -> list[Row]:
    n = 200 if cfg.quick else 1000
    total = 200_000 if cfg.quick else 1_000_000
    # The fake heartbeats make the shards heartbeating ones: a long timeout keeps the master
    # from killing them as hung between rounds.
    spec = Spec(n=n, argv=[SLEEP, "1000"], detach=True, orch_args=["--heartbeat-timeout", "1h"])
    fleet = start("orch", spec, cfg.sub("ingest"))
    orch_rates: list[float] = []
    bare_rates: list[float] = []
    cpu_pct: list[float] = []
    try:
        if fleet.wait_running(n, 120) is None:
            raise Skip(f"error: {n} shards not running")
        run, ids = _run_info(fleet)
        bare_ep = f"ipc://{fleet.workdir}/bare.sock"
        for _ in range(cfg.repeat):
            orch_rates.append(_orch_round(run, ids, total))
            log(cfg, f"ingest orch: {orch_rates[-1]:,.0f} msg/s")
            bare_rates.append(_bare_round(bare_ep, run["id"], ids, total))
            log(cfg, f"ingest bare ROUTER: {bare_rates[-1]:,.0f} msg/s")
        cpu_pct = _paced_cpu(fleet, run, ids, 4.0 if cfg.quick else 10.0)
    except Skip as exc:
        return [_ingest_row(n, total, cell(text=str(exc)), None)]
    finally:
        fleet.close()
    rows = [_ingest_row(n, total, cell(orch_rates), cell(bare_rates))]
    rows.append(Row(key="hb_cpu", family="progress",
                    metric=f"Master CPU, {n:,} shards heartbeating 1/s", unit="% core",
                    better="lower", orch=cell(cpu_pct), target=3.0 if n == 1000 else None,
                    note="three sub-windows"))
    return rows


def _ingest_row(n: int, total: int, orch: object, bare: object) -> Row:
    return Row(key="ingest", family="progress",
               metric=f"Master ingest, {total:,} heartbeats over {n:,} connections",
               unit="msg/s", better="higher", orch=orch, limit=bare,  # type: ignore[arg-type]
               limit_label="bare pyzmq ROUTER", target=250_000 if n == 1000 else None,
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
