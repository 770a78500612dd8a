"""Status latency (metric 10): a status command against a live fleet, end to end.

Wall time of the whole subprocess (interpreter start included), median of
10 calls per command, the commands alternating call by call while every
fleet is up: ``orch status RUN`` and ``orch status RUN --json`` (a detached
run), ``supervisorctl status``, ``pm2 jlist``, ``circusctl status``.
"""

from __future__ import annotations

import time

from bench.common import ORCH, SLEEP, Config, Row, Skip, cell, log, run_cmd
from bench.peers import Fleet, Spec, start

MANAGERS = ("orch", "supervisor", "circus", "pm2")


def _commands(fleet: Fleet) -> dict[str, list[str]]:
    if fleet.name == "orch":
        base = [*ORCH, "status", fleet.run_id or "", "--home", fleet.home or ""]
        return {"orch": base, "orch --json": [*base, "--json"]}
    return {fleet.name: fleet.ctl}


def status(cfg: Config) -> list[Row]:
    n = 100 if cfg.quick else 1000
    calls = 5 if cfg.quick else 10
    fleets: dict[str, Fleet] = {}
    texts: dict[str, str] = {}
    samples: dict[str, list[float]] = {}
    try:
        for name in MANAGERS:
            try:
                fleet = start(name, Spec(n=n, argv=[SLEEP, "1000"], detach=(name == "orch")),
                              cfg.sub(f"status-{name}"))
            except Skip as exc:
                texts[name] = str(exc)
                continue
            fleets[name] = fleet
            if fleet.wait_running(n, 180) is None:
                texts[name] = f"error: {n} not running after 180 s"
        cmds = {k: v for f in fleets.values() if f.name not in texts
                for k, v in _commands(f).items()}
        for k, argv in cmds.items():  # warm the page cache once
            out = run_cmd(argv, 60, env=fleets[k.split()[0]].env)
            if out.returncode != 0 and not (k == "supervisor" and out.returncode == 3):
                texts[k] = f"error: exit {out.returncode}"
        for _ in range(calls):
            for k, argv in cmds.items():
                if k in texts:
                    continue
                t0 = time.perf_counter()
                run_cmd(argv, 60, env=fleets[k.split()[0]].env)
                samples.setdefault(k, []).append(time.perf_counter() - t0)
        log(cfg, "status: " + ", ".join(f"{k} {sorted(v)[len(v) // 2] * 1000:.0f} ms"
                                        for k, v in samples.items()))
    finally:
        for fleet in fleets.values():
            fleet.close()

    def c(k: str) -> object:
        if k in samples:
            return cell([s * 1000 for s in samples[k]])
        return cell(text=texts.get(k, "n/a"))

    peers = {m: c(m) for m in MANAGERS[1:]}
    return [
        Row(key="status", family="status", metric=f"Status: `status` of a live {n:,}-child run",
            unit="ms", better="lower", orch=c("orch"), peers=peers, target=150,  # type: ignore
            note="orch status RUN; supervisorctl status; circusctl status; pm2 jlist"),
        Row(key="status_json", family="status",
            metric=f"Status: `orch status RUN --json`, {n:,} shards", unit="ms",
            better="lower", orch=c("orch --json"), peers={"pm2": peers["pm2"]},  # type: ignore
            target=150, note="pm2 jlist is its JSON status"),
    ]
