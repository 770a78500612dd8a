"""Restarts: respawn latency (2), crash loop (4), clean finish (5), hang detection (6).

Respawn: 10 ``sleep`` children with immediate restart (orch: ``--restart
always --backoff-initial 0``; supervisor ``autorestart=true startsecs=0``;
circus and pm2 defaults, which restart at once). One child at a time gets
SIGKILL; the latency runs from ``kill()`` until a new child of the manager
has exec'd ``sleep``, polled in a tight loop with 0.2 ms sleeps.

Crash loop and clean finish use default settings and count runs by a line
each run appends to a file, so no short-lived child is missed.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

from bench.common import (
    PY,
    REPO,
    SH,
    SLEEP,
    Config,
    Row,
    Skip,
    cell,
    children,
    collect,
    cpu_ns,
    percentile,
    proc_stat,
    running,
)
from bench.peers import PEER_NAMES, Fleet, Spec, orch_status_json, start

RESTARTERS = ("orch", "supervisor", "circus", "pm2")


def _up(name: str, cfg: Config, spec: Spec, tag: str, timeout_s: float = 60.0,
        comm: str = "sleep") -> Fleet:
    fleet = start(name, spec, cfg.sub(f"{tag}-{name}"))
    if fleet.wait_running(spec.n, timeout_s, comm) is None:
        fleet.close()
        raise Skip(f"error: {spec.n} children not running after {timeout_s:g} s")
    return fleet


def respawn_round(name: str, cfg: Config, kills: int, p90s: list[float],
                  res: list[float], budget_s: float = 60.0, n: int = 10,
                  respawn: bool | None = True) -> float:
    """Median respawn latency (ms) over ``kills`` kills, fewer when ``budget_s`` runs out.

    Each kill hits a child that has not been killed before (the lowest pids
    first; a respawned child has a higher pid), so under default settings
    every kill is the first failure of its shard.
    """
    fleet = _up(name, cfg, Spec(n=n, argv=[SLEEP, "1000"], respawn=respawn), "respawn")
    lat: list[float] = []
    try:
        time.sleep(0.5)
        mgr = fleet.manager()
        assert mgr is not None
        t_round = time.perf_counter()
        for i in range(kills):
            if i >= 3 and time.perf_counter() - t_round > budget_s:
                break
            before = set(running(mgr))
            if len(before) < n:
                time.sleep(0.3)
                before = set(running(mgr))
            victim = sorted(before)[i % len(before)]
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            polls, found = 0, False
            while time.perf_counter() - t0 < 15.0:
                polls += 1
                for kid in children(mgr):
                    if kid not in before:
                        st = proc_stat(kid)
                        if st and st[0] == "sleep" and st[1] not in "ZX":
                            found = True
                            break
                if found:
                    break
                time.sleep(0.0002)
            took = time.perf_counter() - t0
            if not found:
                raise Skip("no respawn within 15 s")
            lat.append(took * 1000)
            res.append(took * 1000 / polls)
            time.sleep(0.2)
    finally:
        fleet.close()
    p90s.append(percentile(lat, 90))
    return statistics.median(lat)


def respawn(cfg: Config) -> list[Row]:
    kills, budget = (6, 4.0) if cfg.quick else (20, 30.0)
    p90: dict[str, list[float]] = {n: [] for n in RESTARTERS}
    res: list[float] = []
    got = collect(cfg.repeat, {
        n: (lambda n=n: respawn_round(n, cfg, kills, p90[n], res, budget)) for n in RESTARTERS
    }, cfg, "respawn")
    got["parallel"] = cell(text="n/a (no restart)")
    note = (f"up to {kills} kills per round (at least 3; fewer when a manager takes over "
            f"{budget:g} s), 10 children; polling resolution "
            f"~{statistics.median(res) if res else 0:.2f} ms")
    p90_cells = {n: (cell(p90[n]) if got[n].ok else cell(text=got[n].text))
                 for n in (*RESTARTERS, "parallel")}
    rows = [
        Row(key="respawn_median", family="respawn", metric="Respawn after SIGKILL, median",
            unit="ms", better="lower", orch=got.pop("orch"), peers=got, target=4.0, note=note),
        Row(key="respawn_p90", family="respawn", metric="Respawn after SIGKILL, p90",
            unit="ms", better="lower", orch=p90_cells.pop("orch"), peers=p90_cells),
    ]
    return rows + respawn_default(cfg, kills, budget)


def respawn_default(cfg: Config, kills: int, budget: float) -> list[Row]:
    """The same, 100 children, every manager with its default settings (orch: the first
    restart of a failure streak is immediate; later ones back off)."""
    n = 100
    p90: dict[str, list[float]] = {m: [] for m in RESTARTERS}
    res: list[float] = []
    got = collect(cfg.repeat, {
        m: (lambda m=m: respawn_round(m, cfg, kills, p90[m], res, budget, n=n, respawn=None))
        for m in RESTARTERS}, cfg, "respawn (defaults)")
    got["parallel"] = cell(text="n/a (no restart)")
    p90_cells = {m: (cell(p90[m]) if got[m].ok else cell(text=got[m].text))
                 for m in (*RESTARTERS, "parallel")}
    note = (f"default settings, {n} children, up to {kills} kills per round, each of a child "
            "not killed before (orch: the first restart of a streak); polling resolution "
            f"~{statistics.median(res) if res else 0:.2f} ms")
    return [
        Row(key="respawn_default_median", family="respawn",
            metric=f"Respawn after SIGKILL, default settings, {n} children, median", unit="ms",
            better="lower", orch=got.pop("orch"), peers=got, target=4.0, note=note),
        Row(key="respawn_default_p90", family="respawn",
            metric=f"Respawn after SIGKILL, default settings, {n} children, p90", unit="ms",
            better="lower", orch=p90_cells.pop("orch"), peers=p90_cells),
    ]


# --- crash loop and clean finish ---------------------------------------------------------


def _lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def _window(name: str, cfg: Config, script: str, n: int, window_s: float, tag: str,
            start_after_first: bool) -> tuple[int, float, float]:
    """Run ``n`` copies of ``sh -c script`` (with $F the count file) for a window.

    Returns (runs counted in the window, manager CPU % of a core, runs in total).
    """
    work = cfg.sub(f"{tag}-{name}")
    counter = os.path.join(work, "runs.txt")
    argv = [SH, "-c", script.replace("$F", counter)]
    fleet = start(name, Spec(n=n, argv=argv), work)
    try:
        t_start = time.perf_counter()
        if start_after_first:  # the window opens once every child ran once
            while _lines(counter) < n and time.perf_counter() - t_start < 30:
                time.sleep(0.005)
        mgr, cpu0 = None, None
        while mgr is None and time.perf_counter() - t_start < 30:
            mgr = fleet.manager()
            time.sleep(0.005)
        if mgr is None:
            raise Skip("error: manager did not start")
        cpu0 = cpu_ns(mgr) or 0
        runs0 = _lines(counter) if start_after_first else 0
        t0 = time.perf_counter()
        cpu_last = cpu0
        while time.perf_counter() - t0 < window_s:
            c = cpu_ns(mgr)
            if c is not None:
                cpu_last = c
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        total = _lines(counter)
        return total - runs0, (cpu_last - cpu0) / 1e9 / elapsed * 100, total
    finally:
        fleet.close()


def crash_loop(cfg: Config) -> list[Row]:
    window = 4.0 if cfg.quick else 60.0
    cpu: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}

    def one(name: str) -> float:
        runs, pct, total = _window(name, cfg, "echo x >> $F; exit 1", 10, window, "crash", True)
        cpu.setdefault(name, []).append(pct)
        totals.setdefault(name, []).append(total)
        return runs / window * 60

    got = collect(1, {n: (lambda n=n: one(n)) for n in ("orch", *PEER_NAMES)}, cfg, "crash")
    cpu_cells = {n: cell(cpu[n]) if n in cpu else cell(text=got[n].text) for n in got}
    # GNU parallel runs each job once and never restarts: no restart loop to compare.
    got["parallel"] = cpu_cells["parallel"] = cell(text="n/a (no restart)")
    tot = ", ".join(f"{n} {int(v[0])}" for n, v in totals.items())
    return [
        Row(key="crash_restarts", family="crash",
            metric=f"Crash loop: restarts/min (10 children exit 1; {window:g} s window)",
            unit="/min", better="lower", orch=got.pop("orch"), peers=got,
            note=f"default settings; runs in all: {tot}. orch gives up after max_restarts "
                 "(5): the first restart at once, then 1,2,4,8 s; supervisor gives up after "
                 "startretries; GNU parallel never restarts"),
        Row(key="crash_cpu", family="crash", metric="Crash loop: manager CPU",
            unit="% core", better="lower", orch=cpu_cells.pop("orch"), peers=cpu_cells),
    ]


def clean_finish(cfg: Config) -> list[Row]:
    window = 4.0 if cfg.quick else 15.0

    def one(name: str) -> float:
        return _window(name, cfg, "echo x >> $F; sleep 1; exit 0", 10, window, "finish",
                       False)[2]

    got = collect(1, {n: (lambda n=n: one(n)) for n in ("orch", *PEER_NAMES)}, cfg, "finish")
    return [Row(key="finish_runs", family="finish",
                metric=f"Clean finish: runs of 10 children (exit 0 after 1 s) in {window:g} s",
                unit="runs", better="lower", orch=got.pop("orch"), peers=got, target=10,
                note="10 = each ran once; pm2 and circus restart a finished child by "
                     "default (pm2 autorestart, circus respawn)")]


# --- hang detection (orch only) ----------------------------------------------------------


def hang(cfg: Config) -> list[Row]:
    rounds = max(cfg.repeat, 3)
    spec = Spec(n=2, argv=[PY, str(REPO / "bench" / "sdk_shard.py")], orch_args=[
        "--heartbeat-timeout", "2s", "--heartbeat-interval", "0.5s", "--backoff-initial", "0",
        "--max-restarts", "100"])
    comm = os.path.basename(PY)[:15]
    fleet = _up("orch", cfg, spec, "hang", comm=comm)
    samples: list[float] = []
    try:
        mgr = fleet.manager()
        assert mgr is not None
        for _ in range(rounds):
            time.sleep(1.5)  # beats flowing: the timeout applies after a first heartbeat
            shards = [s for s in orch_status_json(fleet)["shards"] if s["pid"]]
            if not shards or shards[0].get("heartbeat_age_s") is None:
                raise Skip("error: no heartbeat seen from the SDK shard")
            before = set(children(mgr))
            victim = shards[0]["pid"]
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGSTOP)
            while time.perf_counter() - t0 < 10:
                new = [k for k in children(mgr) if k not in before]
                if any((st := proc_stat(k)) and st[0] == comm for k in new):
                    samples.append(time.perf_counter() - t0)
                    break
                time.sleep(0.001)
            else:
                raise Skip("error: not replaced within 10 s")
    except Skip as exc:
        return [_hang_row(cell(text=str(exc)))]
    finally:
        fleet.close()
    return [_hang_row(cell(samples))]


def _hang_row(c: object) -> Row:
    return Row(key="hang", family="hang",
               metric="Hang: SIGSTOP to replacement running (timeout 2 s, beat 0.5 s)",
               unit="s", better="lower", orch=c,  # type: ignore[arg-type]
               peers={n: cell(text="n/a (no heartbeat)") for n in PEER_NAMES}, target=2.2,
               note="target: heartbeat timeout + 0.2 s; SIGSTOP lands at a random phase of "
                    "the 0.5 s beat")
