"""Idle overhead (metric 3): manager CPU and RSS while N ``sleep`` children do nothing.

orch runs detached (``orch run -d``): the figure is the master (the daemon
whose pid is in master.pid); its guardian's RSS is a separate row. pm2's
figure is its daemon ("God"), not the CLI. One window per manager and size,
split in three sub-windows whose spread is shown as min–max.
"""

from __future__ import annotations

import time

from bench.common import (
    SLEEP,
    Config,
    Row,
    Skip,
    cell,
    children,
    collect,
    cpu_ns,
    proc_stat,
    rss_mib,
)
from bench.peers import PEER_NAMES, Spec, start

SUBWINDOWS = 3


def measure(name: str, cfg: Config, n: int, window_s: float,
            out: dict[str, tuple[list[float], float, float | None]]) -> float:
    fleet = start(name, Spec(n=n, argv=[SLEEP, "1000"], detach=(name == "orch")),
                  cfg.sub(f"idle-{name}"))
    try:
        if fleet.wait_running(n, 120) is None:
            raise Skip(f"error: {n} children not running after 120 s")
        time.sleep(1.0 if cfg.quick else 3.0)  # settle: start-up work is not idle work
        mgr = fleet.manager()
        assert mgr is not None
        pcts = []
        for _ in range(SUBWINDOWS):
            c0, t0 = cpu_ns(mgr), time.perf_counter()
            time.sleep(window_s / SUBWINDOWS)
            c1, t1 = cpu_ns(mgr), time.perf_counter()
            if c0 is None or c1 is None:
                raise Skip("error: manager exited")
            pcts.append((c1 - c0) / 1e9 / (t1 - t0) * 100)
        rss = rss_mib(mgr) or 0.0
        guardian = None
        if name == "orch":
            for kid in children(mgr):
                st = proc_stat(kid)
                if st and st[0] != "sleep":
                    guardian = rss_mib(kid)
        out[name] = (pcts, rss, guardian)
        return sum(pcts) / len(pcts)
    finally:
        fleet.close()


def idle(cfg: Config) -> list[Row]:
    window = 4.0 if cfg.quick else 30.0
    sizes = [100] if cfg.quick else [100, 1000]
    rows = []
    for n in sizes:
        out: dict[str, tuple[list[float], float, float | None]] = {}
        got = collect(1, {m: (lambda m=m, n=n, out=out: measure(m, cfg, n, window, out))
                          for m in ("orch", *PEER_NAMES)}, cfg, f"idle N={n}")
        cpu = {m: cell(out[m][0]) if m in out else cell(text=got[m].text) for m in got}
        rss = {m: cell(out[m][1]) if m in out else cell(text=got[m].text) for m in got}
        rows.append(Row(key=f"idle_cpu_{n}", family="idle",
                        metric=f"Idle manager CPU, {n:,} children ({window:g} s)",
                        unit="% core", better="lower", orch=cpu.pop("orch"), peers=cpu,
                        target=0.05 if n == 100 else None,
                        note="orch: the detached master; pm2: its daemon"))
        rows.append(Row(key=f"idle_rss_{n}", family="idle",
                        metric=f"Idle manager RSS, {n:,} children", unit="MiB",
                        better="lower", orch=rss.pop("orch"), peers=rss,
                        target=35.0 if n == 100 else None,
                        note="orch: the master alone; its guardian is the next row"))
        g = out.get("orch", ([], 0.0, None))[2]
        rows.append(Row(key=f"idle_guardian_rss_{n}", family="idle",
                        metric=f"orch guardian RSS, {n:,} children", unit="MiB",
                        better="lower", orch=cell(g) if g is not None else cell(text="n/a"),
                        note="the process that stops attempts if the master is SIGKILLed: "
                             "its own small program (python -m orchestrator.guardian), "
                             "started with posix_spawn"))
    return rows
