"""Multi-million-item runs: 8 SDK shards x 5,000,000 items, end to end, against a bare loop.

Each shard is bench/items_shard.py: a loop over N items doing the same small
piece of work per item (an integer hash step), calling ``shards.advance()``
per item under orch, or nothing (``--bare``) when run without orch. The
shard prints the seconds its loop took, so items/s per shard is measured
the same way on both sides (loop time, not interpreter start). End to end
is ``8 x N`` items over the wall time from launching ``orch run --split 8``
(or the 8 bare processes) until it exits. The master's CPU is sampled from
/proc every 20 ms while it runs (the last sample before it exits; the
shards' own CPU is not in it) and divided by the millions of items.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time

from bench.common import ORCH, PY, REPO, Config, Row, base_env, cell, cpu_ns, launch, log, stop

SHARD = str(REPO / "bench" / "items_shard.py")
SHARDS = 8


def _loop_times(texts: list[str]) -> list[float]:
    out = []
    for text in texts:
        for line in text.splitlines():
            if "loop_s=" in line:
                out.append(float(line.rsplit("loop_s=", 1)[1].split()[0]))
    return out


def orch_round(cfg: Config, n: int) -> tuple[float, float, float]:
    """(end-to-end items/s, median per-shard items/s, master CPU s per million items)."""
    work = cfg.sub("items-orch")
    home = os.path.join(work, "h")
    argv = [*ORCH, "run", "--home", home, "--split", str(SHARDS), "--", PY, SHARD, str(n)]
    t0 = time.perf_counter()
    proc = launch(argv, cwd=work, env=base_env())
    cpu = 0
    try:
        while proc.poll() is None:
            got = cpu_ns(proc.pid)
            if got is not None:
                cpu = got
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"orch run exited {proc.returncode}")
    texts = []
    for path in glob.glob(os.path.join(home, "runs", "*", "logs", "*.out")):
        with open(path, errors="replace") as f:
            texts.append(f.read())
    loops = sorted(_loop_times(texts))
    if len(loops) != SHARDS:
        raise RuntimeError(f"{len(loops)} shards reported their loop time")
    return (SHARDS * n / wall, n / loops[len(loops) // 2],
            cpu / 1e9 / (SHARDS * n / 1e6))


def bare_round(n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    procs = [launch([PY, SHARD, str(n), "--bare"], env=base_env(), stdout=subprocess.PIPE)
             for _ in range(SHARDS)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        outs.append(out.decode())
        stop(p)
    wall = time.perf_counter() - t0
    loops = sorted(_loop_times(outs))
    return SHARDS * n / wall, n / loops[len(loops) // 2]


def items(cfg: Config) -> list[Row]:
    n = 500_000 if cfg.quick else 5_000_000
    e2e: list[float] = []
    per: list[float] = []
    cpu: list[float] = []
    b_e2e: list[float] = []
    b_per: list[float] = []
    for r in range(cfg.repeat):
        for who in (("orch", "bare") if r % 2 == 0 else ("bare", "orch")):
            if who == "orch":
                a, b, c = orch_round(cfg, n)
                e2e.append(a)
                per.append(b)
                cpu.append(c)
                log(cfg, f"items orch #{r + 1}: {a:,.0f} items/s, {b:,.0f}/shard, "
                    f"master {c * 1000:.1f} ms CPU per million")
            else:
                a, b = bare_round(n)
                b_e2e.append(a)
                b_per.append(b)
                log(cfg, f"items bare #{r + 1}: {a:,.0f} items/s, {b:,.0f}/shard")
    what = f"{SHARDS} SDK shards x {n:,} items"
    return [
        Row(key="items_per_shard", family="items", metric=f"Items/s per shard, {what}",
            unit="items/s", better="higher", orch=cell(per), limit=cell(b_per),
            limit_label="bare loop, no orch",
            note="loop time measured inside each shard; orch: advance() per item"),
        Row(key="items_e2e", family="items", metric=f"Items/s end to end, {what}",
            unit="items/s", better="higher", orch=cell(e2e), limit=cell(b_e2e),
            limit_label="8 bare processes", note="launch to exit, interpreter starts included"),
        Row(key="items_master_cpu", family="items",
            metric=f"Master CPU per million items, {what}", unit="ms",
            better="lower", orch=cell([c * 1000 for c in cpu]),
            note="the master's own CPU (shards excluded), sampled every 20 ms"),
    ]
