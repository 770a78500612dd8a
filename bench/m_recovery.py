"""Master death and resume (issue 4), orch alone.

A detached run of N ``sleep`` shards; the master gets SIGKILL. Figure 1:
from ``kill()`` until every attempt that was running is gone (exited or a
zombie; the guardian stops them). Figure 2: ``orch resume RUN`` launched
until N children run again below it.
"""

from __future__ import annotations

import time

from bench.common import (
    ORCH,
    SLEEP,
    Config,
    Row,
    Skip,
    base_env,
    cell,
    collect,
    kill_master_timed,
    launch,
    stop,
)
from bench.common import running as sleeps
from bench.peers import Fleet, Spec, start


def one(cfg: Config, n: int, resumed: list[float]) -> float:
    fleet = start("orch", Spec(n=n, argv=[SLEEP, "1000"], detach=True), cfg.sub("recovery"))
    resume: Fleet | None = None
    try:
        if fleet.wait_running(n, 120) is None:
            raise Skip(f"error: {n} not running")
        mgr = fleet.manager()
        assert mgr is not None
        gone = kill_master_timed(mgr, sleeps(mgr))
        argv = [*ORCH, "resume", fleet.run_id or "", "--home", fleet.home or ""]
        t1 = time.perf_counter()
        resume = Fleet("orch", launch(argv, cwd=fleet.workdir, env=base_env()), fleet.workdir, t1)
        took = resume.wait_running(n, 120)
        if took is None:
            raise Skip("error: resume did not bring every shard back")
        resumed.append(took)
        return gone
    finally:
        if resume is not None:
            resume.close()
        fleet.close()
        stop(None)


def recovery(cfg: Config) -> list[Row]:
    rows = []
    for n in [100] if cfg.quick else [100, 1000]:
        resumed: list[float] = []
        got = collect(cfg.repeat, {"orch": lambda n=n, r=resumed: one(cfg, n, r)}, cfg,
                      f"recovery N={n}")
        rows.append(Row(key=f"master_kill_{n}", family="recovery",
                        metric=f"Master SIGKILL to last attempt gone, {n:,} children", unit="s",
                        better="lower", orch=got["orch"],
                        note="the guardian sends SIGTERM to every group at once"))
        rows.append(Row(key=f"resume_{n}", family="recovery",
                        metric=f"`orch resume` to {n:,} shards running again", unit="s",
                        better="lower",
                        orch=cell(resumed) if resumed else cell(text=got["orch"].text)))
    return rows
