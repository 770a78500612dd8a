"""The cost curve: how each cost grows with the number of shards, up to the machine's ceiling.

``python -m bench --only scale`` runs N = 10, 100, 1,000, 2,500 and the
ceiling (``--quick``: 10, 100, 500) concurrent ``sleep 1000`` children,
plus one run of 10,000 shards with ``--jobs`` at the ceiling (``--quick``:
2,000 shards, ``--jobs 500``).

The ceiling is what the open-files hard limit allows at orch's own count of
descriptors per live attempt (``FDS_PER_ATTEMPT``: its two pipes and its
heartbeat connection; log files are capped at 4,096 open in all and reserved
once), which the "open descriptors" row shows.

Per N, orch runs detached (``orch run -d --jobs N``) and one fleet gives,
in order: time to all running (launch of the command until N children run
below the master, counted in /proc), idle CPU and RSS of the master and of
its guardian, open descriptors, ``orch status RUN`` and ``orch status RUN
--json`` latency (alternating), master CPU while N connections send one
heartbeat a second each (bench/ingest_sender.py, ``paced``; the shards are
``sleep``s, the heartbeats carry their current attempt numbers), master
SIGKILL until the last attempt is gone, and ``orch resume`` until N run
again. Peers (supervisor, circus, pm2, GNU parallel) run the same N for
start-up, idle CPU and RSS and their status command, alternating with
orch; a peer that does not get there within ``PEER_TIMEOUT_S`` is shown as
giving up at that N and is not tried at larger N. The limit row is the bare
``posix_spawn`` loop. Rounds: ``--repeat`` for N up to 1,000, one above
(each round of a large N takes minutes on 2 cores).
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import time
from typing import Any

from bench.common import (
    ORCH,
    PY,
    SLEEP,
    Cell,
    Config,
    Row,
    Skip,
    base_env,
    cell,
    children,
    cpu_ns,
    kill_master_timed,
    launch,
    log,
    proc_stat,
    rss_mib,
    run_cmd,
)
from bench.common import running as sleeps
from bench.m_progress import SENDER, _finish, _run_info
from bench.peers import PEER_NAMES, Fleet, Spec, start
from orchestrator.concurrency import FDS_PER_ATTEMPT, fd_ceiling

PEER_TIMEOUT_S = 300.0
IDS_PER_SENDER = 900  # a ZeroMQ context holds at most 1,023 sockets

#: metric id -> (label, unit); the order of the tables and plots.
METRICS: dict[str, tuple[str, str]] = {
    "up": ("time to all running", "s"),
    "idle_cpu": ("idle CPU", "% core"),
    "rss": ("idle RSS", "MiB"),
    "guardian_rss": ("guardian RSS", "MiB"),
    "fds": ("master's open descriptors", "fds"),
    "status": ("`status` latency", "ms"),
    "status_json": ("`orch status RUN --json` latency", "ms"),
    "hb_cpu": ("master CPU, N shards heartbeating 1/s", "% core"),
    "kill": ("master SIGKILL to last attempt gone", "s"),
    "resume": ("`orch resume` to all running", "s"),
}


def ceiling() -> tuple[int, str]:
    """Concurrent attempts this machine allows orch, and what sets that number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    by_fds = fd_ceiling(hard)  # orch's own default_jobs ceiling
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    used = sum(1 for n in os.listdir("/proc") if n.isdigit())
    by_pids = (pid_max - used) * 9 // 10
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    by_nproc = nproc * 9 // 10 if nproc != resource.RLIM_INFINITY else by_pids
    limits = {f"open-files hard limit {hard:,} ({FDS_PER_ATTEMPT} per attempt + log files)": by_fds,
              f"pid_max {pid_max:,} ({used:,} in use)": by_pids,
              f"max user processes {nproc:,}": by_nproc}
    why = min(limits, key=lambda k: limits[k])
    return limits[why], why


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _guardian(mgr: int) -> int | None:
    for kid in children(mgr):
        st = proc_stat(kid)
        if st and st[0] != "sleep":
            return kid
    return None


def _cpu_pct(pid: int, window_s: float) -> float:
    c0, t0 = cpu_ns(pid), time.perf_counter()
    time.sleep(window_s)
    c1, t1 = cpu_ns(pid), time.perf_counter()
    if c0 is None or c1 is None:
        raise Skip("error: manager exited")
    return (c1 - c0) / 1e9 / (t1 - t0) * 100


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    out = run_cmd(argv, 120, env=env)
    took = time.perf_counter() - t0
    if out.returncode not in (0, 3):  # supervisorctl status exits 3 when a program is not up
        raise RuntimeError(f"{argv[0]} exited {out.returncode}: {out.stderr.strip()[:80]}")
    return took * 1000


def _senders(endpoint: str, run_id: str, ids: list[str], seconds: float) -> list[Any]:
    return [launch([PY, SENDER, endpoint, run_id, "1", str(seconds), "paced",
                    *ids[i:i + IDS_PER_SENDER]], stdout=subprocess.PIPE)
            for i in range(0, len(ids), IDS_PER_SENDER)]


def _heartbeat_cpu(fleet: Fleet, window_s: float) -> list[float]:
    """Master CPU (% core) while every shard's connection beats once a second."""
    mgr = fleet.manager()
    assert mgr is not None
    run, ids = _run_info(fleet)
    procs = _senders(run["endpoint"], run["id"], ids, window_s + 3.0)
    try:
        time.sleep(2.0)  # connections made, first beats in  # allowed-sleep: settle
        return [_cpu_pct(mgr, window_s / 2) for _ in range(2)]
    finally:
        _finish(procs, 30)


def orch_round(cfg: Config, n: int, out: dict[str, list[float]], jobs: int | None = None,
               full: bool = True) -> None:
    """One detached run of ``n`` shards (``jobs`` at once); appends every figure to ``out``."""
    jobs = jobs or n
    spec = Spec(n=n, argv=[SLEEP, "1000"], detach=True,
                orch_args=["--jobs", str(jobs), "--heartbeat-timeout", "1h"])
    fleet = start("orch", spec, cfg.sub(f"scale-orch-{n}"))
    resume: Fleet | None = None
    try:
        took = fleet.wait_running(jobs, PEER_TIMEOUT_S)
        if took is None:
            raise Skip(f"error: {fleet.count()} of {jobs} running after {PEER_TIMEOUT_S:g} s")
        out.setdefault("up", []).append(took)
        mgr = fleet.manager()
        assert mgr is not None
        time.sleep(1.0)  # allowed-sleep: start-up work is not idle work
        window = 2.0 if cfg.quick else 5.0
        out.setdefault("idle_cpu", []).append(_cpu_pct(mgr, window))
        rss = rss_mib(mgr) or 0.0
        out.setdefault("rss", []).append(rss)
        g = _guardian(mgr)
        if g is not None:
            out.setdefault("guardian_rss", []).append(rss_mib(g) or 0.0)
        out.setdefault("fds", []).append(float(len(os.listdir(f"/proc/{mgr}/fd"))))
        base = [*ORCH, "status", fleet.run_id or "", "--home", fleet.home or ""]
        for _ in range(2 if cfg.quick else 3):
            out.setdefault("status", []).append(_timed(base))
            out.setdefault("status_json", []).append(_timed([*base, "--json"]))
        if not full:
            return
        out.setdefault("hb_cpu", []).extend(_heartbeat_cpu(fleet, 4.0 if cfg.quick else 6.0))
        out.setdefault("kill", []).append(kill_master_timed(mgr, sleeps(mgr)))
        argv = [*ORCH, "resume", fleet.run_id or "", "--home", fleet.home or ""]
        t1 = time.perf_counter()
        resume = Fleet("orch", launch(argv, cwd=fleet.workdir, env=base_env()), fleet.workdir,
                       t1)
        took = resume.wait_running(n, PEER_TIMEOUT_S)
        if took is None:
            raise Skip("error: resume did not bring every shard back")
        out.setdefault("resume", []).append(took)
    finally:
        if resume is not None:
            resume.close()
        fleet.close()


def peer_round(cfg: Config, name: str, n: int, out: dict[str, list[float]]) -> None:
    timeout = 60.0 if cfg.quick else PEER_TIMEOUT_S
    fleet = start(name, Spec(n=n, argv=[SLEEP, "1000"]), cfg.sub(f"scale-{name}-{n}"))
    try:
        took = fleet.wait_running(n, timeout)
        if took is None:
            raise Skip(f"gave up: {fleet.count()} of {n:,} running after {timeout:g} s")
        out.setdefault("up", []).append(took)
        mgr = fleet.manager()
        assert mgr is not None
        if name == "spawn-loop":
            return
        time.sleep(1.0)  # allowed-sleep: start-up work is not idle work
        out.setdefault("idle_cpu", []).append(_cpu_pct(mgr, 2.0 if cfg.quick else 5.0))
        rss = rss_mib(mgr) or 0.0
        out.setdefault("rss", []).append(rss)
        if fleet.ctl:
            for _ in range(2 if cfg.quick else 3):
                out.setdefault("status", []).append(_timed(fleet.ctl, fleet.env))
    finally:
        fleet.close()


def _rows(n: int, label: str, got: dict[str, dict[str, list[float]]],
          texts: dict[str, str], note: str = "") -> list[Row]:
    rows = []
    for metric, (what, unit) in METRICS.items():
        def c(name: str, metric: str = metric) -> Cell:
            if name in texts:
                return cell(text=texts[name])
            xs = got.get(name, {}).get(metric)
            return cell(xs) if xs else cell(text="n/a")

        orch = c("orch")
        if not orch.ok and "orch" not in texts:
            continue
        peers = {}
        if metric in ("up", "idle_cpu", "rss", "status"):
            peers = {p: c(p) for p in PEER_NAMES if p in got or p in texts}
            if metric == "status" and "parallel" in peers:
                peers["parallel"] = cell(text="n/a (no status command)")
        limit = c("spawn-loop") if metric == "up" and ("spawn-loop" in got) else None
        rows.append(Row(key=f"scale:{metric}:{label}", family="scale",
                        metric=f"Scale {label}: {what}", unit=unit, better="lower", orch=orch,
                        peers=peers, limit=limit,
                        limit_label="posix_spawn loop" if limit else "", note=note))
    return rows


def scale(cfg: Config) -> list[Row]:
    _raise_nofile()
    top, why = ceiling()
    sizes = [10, 100, 500] if cfg.quick else [10, 100, 1000, 2500, top]
    log(cfg, f"scale: ceiling {top:,} ({why}); sizes {sizes}")
    rows: list[Row] = []
    gave_up: dict[str, str] = {}
    for n in sizes:
        rounds = cfg.repeat if n <= 1000 else 1
        got: dict[str, dict[str, list[float]]] = {}
        texts: dict[str, str] = {}
        names = ["orch", *PEER_NAMES, "spawn-loop"]
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                if name in gave_up:
                    texts[name] = gave_up[name]
                    continue
                if name in texts:
                    continue
                started = time.perf_counter()
                out = got.setdefault(name, {})
                try:
                    if name == "orch":
                        orch_round(cfg, n, out)
                    else:
                        peer_round(cfg, name, n, out)
                except Skip as exc:
                    texts[name] = str(exc)
                    if str(exc).startswith("gave up"):
                        gave_up[name] = f"gave up at N={n:,}"
                except Exception as exc:  # noqa: BLE001 - shown in the cell, the run goes on
                    texts[name] = f"error: {str(exc)[:60]}"
                    log(cfg, f"scale N={n} {name}: {exc!r}")
                log(cfg, f"scale N={n} {name} #{r + 1}: "
                    + (texts.get(name) or f"up {out.get('up', [0])[-1]:.3f} s")
                    + f" ({time.perf_counter() - started:.0f} s)")
        label = f"N={n:,}"
        note = f"ceiling: {why}" if n == top else ""
        if n > 1000:
            note = (note + "; " if note else "") + "one round"
        rows += _rows(n, label, got, texts, note)
    rows += big_run(cfg, top)
    return rows


def big_run(cfg: Config, top: int) -> list[Row]:
    """Many more shards than slots: 10,000 shards with --jobs at the ceiling."""
    n, jobs = (2_000, 500) if cfg.quick else (10_000, top)
    got: dict[str, list[float]] = {}
    text = None
    for _ in range(1 if cfg.quick else 2):
        try:
            orch_round(cfg, n, got, jobs=jobs, full=False)
        except Skip as exc:
            text = str(exc)
            break
        log(cfg, f"scale {n:,} shards --jobs {jobs}: up {got['up'][-1]:.2f} s")
    label = f"{n:,} shards, --jobs {jobs:,}"
    out = []
    for metric in ("up", "idle_cpu", "rss", "status", "status_json"):
        what, unit = METRICS[metric]
        if metric == "up":
            what = f"time to {jobs:,} running"
        c = cell(text=text) if text else cell(got.get(metric) or [])
        out.append(Row(key=f"scalebig:{metric}", family="scale", metric=f"Scale {label}: {what}",
                       unit=unit, better="lower", orch=c, note="orch alone"))
    return out


Curve = dict[str, list[tuple[int, Cell]]]


def curves(rows: list[Row]) -> dict[str, Curve]:
    """metric -> contender -> [(N, cell)], from the scale rows of a run."""
    out: dict[str, Curve] = {}
    for r in rows:
        if not r.key.startswith("scale:"):
            continue
        _, metric, label = r.key.split(":", 2)
        n = int(label.removeprefix("N=").replace(",", ""))
        cur = out.setdefault(metric, {})
        contenders: dict[str, Cell | None] = {"orch": r.orch, **r.peers}
        if r.limit is not None:
            contenders["posix_spawn loop"] = r.limit
        for name, c in contenders.items():
            if c is not None and c.ok:
                cur.setdefault(name, []).append((n, c))
    return out


def growth(points: list[tuple[int, Cell]]) -> tuple[float, float] | None:
    """(log-log slope, cost per extra shard) over the points with N >= 100, or None."""
    pts = [(n, min(c.samples)) for n, c in points if n >= 100 and min(c.samples) > 0]
    if len(pts) < 2:
        return None
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(v) for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    ns = [float(n) for n, _ in pts]
    vs = [v for _, v in pts]
    mn, mv = sum(ns) / len(ns), sum(vs) / len(vs)
    snn = sum((x - mn) ** 2 for x in ns)
    per = sum((x - mn) * (v - mv) for x, v in zip(ns, vs, strict=True)) / snn if snn else 0.0
    return slope, per


def describe(metric: str, unit: str, g: tuple[float, float]) -> str:
    slope, per = g
    shape = ("flat" if slope < 0.25 else "sublinear" if slope < 0.85 else
             "linear" if slope < 1.15 else "superlinear")
    scaled = {"s": (per * 1e6, "µs"), "ms": (per * 1e3, "µs"), "MiB": (per * 1024, "KiB"),
              "% core": (per * 1000, "% core per 1,000 shards")}.get(unit, (per, unit))
    value, u = scaled
    if u == "µs" and abs(value) >= 1000:
        value, u = value / 1000, "ms"
    if u.startswith("% core"):
        return f"{shape} (N^{slope:.2f}), {value:+.3g} {u}"
    return f"{shape} (N^{slope:.2f}), {value:+.3g} {u} per shard"

