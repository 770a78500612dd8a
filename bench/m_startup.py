"""Start-up (metric 1) and a large shard list (metric 9).

Start-up: from the moment the manager command is launched until N ``sleep
1000`` children exist below the manager (counted in /proc, zombies excluded;
polled every ~2 ms). orch runs in the foreground (``orch run --split N``),
so its figure includes the interpreter start, reading the task, creating
the run's database and spawning. The limit is a bare ``python -c`` loop of
``os.posix_spawn`` measured the same way.
"""

from __future__ import annotations

import os
import time

from bench.common import (
    ORCH,
    PY,
    SLEEP,
    Cell,
    Config,
    Row,
    Skip,
    cell,
    collect,
    launch,
    run_cmd,
    status_kb,
)
from bench.peers import PEER_NAMES, Fleet, Spec, start

SLEEP_ARGV = [SLEEP, "1000"]
TIMEOUT_S = 90.0


def time_to_running(name: str, cfg: Config, n: int, wait_n: int | None = None,
                    orch_args: list[str] | None = None) -> float:
    fleet = start(name, Spec(n=n, argv=SLEEP_ARGV, orch_args=orch_args or []),
                  cfg.sub(f"up-{name}"))
    try:
        took = fleet.wait_running(wait_n or n, TIMEOUT_S)
        if took is None:
            raise Skip(f"> {TIMEOUT_S:g} s (timed out at {fleet.count()} running)")
        return took
    finally:
        fleet.close()


def _piped_note(orch: Cell, piped: Cell) -> str:
    """The loop that also keeps each child's two pipes open, as orch does to read them."""
    if not piped.ok:
        return f"loop keeping each child's 2 pipes: {piped.text or 'n/a'}"
    text = f"loop keeping each child's 2 pipes open (as orch does): {piped.median:.3f} s"
    if orch.ok and piped.median > 0:
        text += f", orch at {orch.median / piped.median:.2f}x of it"
    return text


#: What ``orch run`` imports before its first spawn (the set tests/unit/test_late_sockets.py
#: keeps zmq and the rest out of).
_FIRST_SPAWN_IMPORTS = (
    "import orchestrator.cli, orchestrator.launch, orchestrator.start, "
    "orchestrator.assemble, orchestrator.views.live"
)


def import_floor_s(rounds: int = 7) -> float:
    """The interpreter time ``orch run`` spends importing before its first spawn: the best
    of ``rounds`` runs of ``python -c IMPORTS`` minus the best of a bare ``python -c pass``
    (alternated)."""
    bare, imports = [], []
    for _ in range(rounds):
        for code, out in (("pass", bare), (_FIRST_SPAWN_IMPORTS, imports)):
            t0 = time.perf_counter()
            run_cmd([PY, "-c", code], 60)
            out.append(time.perf_counter() - t0)
    return min(imports) - min(bare)


def startup(cfg: Config) -> list[Row]:
    rows = []
    sizes = [100] if cfg.quick else [100, 1000]
    targets = {100: 1.5, 1000: 1.25}  # x the posix_spawn loop of the same round (issue 14)
    for n in sizes:
        contenders = {name: (lambda name=name, n=n: time_to_running(name, cfg, n))
                      for name in ("orch", *PEER_NAMES, "spawn-loop", "spawn-loop-pipes")}
        got = collect(cfg.repeat, contenders, cfg, f"start-up N={n}")
        orch, piped = got.pop("orch"), got.pop("spawn-loop-pipes")
        rows.append(Row(
            key=f"startup_{n}", family="startup", metric=f"Start-up: {n:,} sleeps running",
            unit="s", better="lower", orch=orch, limit=got.pop("spawn-loop"),
            limit_label="posix_spawn loop", peers=got, target_x_limit=targets.get(n),
            note=_piped_note(orch, piped) + (
                f"; imports before the first spawn: {import_floor_s() * 1000:.0f} ms"
                if n == sizes[0] else ""),
        ))
    big, jobs = (2_000, 200) if cfg.quick else (10_000, 1000)
    got = collect(cfg.repeat, {"orch": lambda: time_to_running(
        "orch", cfg, big, wait_n=jobs, orch_args=["--jobs", str(jobs)])}, cfg, f"start-up N={big}")
    rows.append(Row(
        key=f"startup_{big}", family="startup",
        metric=f"Start-up: {big:,} shards --jobs {jobs}, {jobs:,} running", unit="s",
        better="lower", orch=got["orch"], note="orch alone",
    ))
    return rows


# --- metric 9: a 100,000-row CSV ----------------------------------------------------------


def write_csv(path: str, rows: int) -> None:
    with open(path, "w") as f:
        f.write("id,merchant,url,country\n")
        for i in range(rows):
            f.write(f"m{i:06d},Merchant {i},https://shop{i}.example/catalog?page=1,FR\n")


def shardlist(cfg: Config) -> list[Row]:
    rows_n, jobs = 100_000, 100
    csv = os.path.join(cfg.sub("csv"), "merchants.csv")
    write_csv(csv, rows_n)
    peaks: list[float] = []

    def one() -> float:
        work = cfg.sub("shardlist")
        home = os.path.join(work, "h")
        argv = [*ORCH, "run", "--home", home, "--shards", csv, "--jobs", str(jobs),
                "--", *SLEEP_ARGV]
        t0 = time.perf_counter()
        fleet = Fleet("orch", launch(argv, cwd=work), work, t0)
        try:
            took = fleet.wait_running(jobs, TIMEOUT_S)
            if took is None:
                raise Skip(f"> {TIMEOUT_S:g} s (timed out)")
            hwm = status_kb(fleet.proc.pid, "VmHWM")
            if hwm is not None:
                peaks.append(hwm / 1024)
            return took
        finally:
            fleet.close()

    got = collect(cfg.repeat, {"orch": one}, cfg, f"shard list {rows_n:,}")
    return [
        Row(key="shardlist_time", family="shardlist",
            metric=f"Shard list: {rows_n:,}-row CSV, --jobs {jobs}, to {jobs} running",
            unit="s", better="lower", orch=got["orch"], note="orch alone"),
        Row(key="shardlist_peak", family="shardlist",
            metric=f"Shard list: peak RSS (VmHWM) of orch, {rows_n:,} rows", unit="MiB",
            better="lower", orch=cell(peaks) if peaks else cell(text="n/a"),
            note="orch alone"),
    ]
