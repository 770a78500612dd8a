"""Logs (metric 8): MB/s of child stdout carried into log files, 100 chatty shards.

Each of 100 children runs ``sh -c 'yes LINE | head -c BYTES'``. The figure
is the payload (100 x BYTES) divided by the time from launching the manager
until every byte is in the log files: for orch until ``orch run`` exits
(every shard done, every line written with its timestamp); for supervisor
(``stdout_logfile`` per process, no rotation, no timestamps) until the files
hold every byte. The limit runs the same 100 pipelines with ``| cat > FILE``
and no manager.
"""

from __future__ import annotations

import glob
import os
import shutil
import time

from bench.common import ORCH, SH, Config, MiB, Row, Skip, base_env, collect, launch, stop
from bench.peers import Spec, start

LINE = "2026-11-26 19:20:01 INFO crawler: fetched page 42 of merchant acme-shop (200 OK)"
N = 100
TIMEOUT_S = 300.0


def _pipeline(nbytes: int) -> str:
    return f"yes '{LINE}' | head -c {nbytes}"


def _size(pattern: str) -> int:
    total = 0
    for path in glob.glob(pattern):
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


def orch_logs(cfg: Config, nbytes: int) -> float:
    work = cfg.sub("logs-orch")
    home = os.path.join(work, "h")
    argv = [*ORCH, "run", "--home", home, "--split", str(N), "--", SH, "-c", _pipeline(nbytes)]
    t0 = time.perf_counter()
    proc = launch(argv, cwd=work, env=base_env())
    try:
        code = proc.wait(TIMEOUT_S)
        took = time.perf_counter() - t0
    finally:
        stop(proc)
    written = _size(os.path.join(home, "runs", "*", "logs", "*.out*"))
    shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        raise Skip(f"error: orch run exited {code}")
    if written < N * nbytes:
        raise Skip(f"error: only {written} bytes in the logs")
    return N * nbytes / took / MiB


def supervisor_logs(cfg: Config, nbytes: int) -> float:
    work = cfg.sub("logs-sup")
    logs = os.path.join(work, "logs")
    os.mkdir(logs)
    fleet = start("supervisor", Spec(n=N, argv=[SH, "-c", _pipeline(nbytes)], respawn=False,
                                     logs=logs), work)
    try:
        want = N * nbytes
        while time.perf_counter() - fleet.t0 < TIMEOUT_S:
            if _size(os.path.join(logs, "*.log")) >= want:
                return want / (time.perf_counter() - fleet.t0) / MiB
            time.sleep(0.02)
        raise Skip(f"> {TIMEOUT_S:g} s (timed out)")
    finally:
        fleet.close()
        shutil.rmtree(work, ignore_errors=True)


def cat_logs(cfg: Config, nbytes: int) -> float:
    work = cfg.sub("logs-cat")
    t0 = time.perf_counter()
    procs = [launch([SH, "-c", _pipeline(nbytes) + f" | cat > {work}/{i}.log"])
             for i in range(N)]
    try:
        for p in procs:
            p.wait(TIMEOUT_S)
        return N * nbytes / (time.perf_counter() - t0) / MiB
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


def logs(cfg: Config) -> list[Row]:
    nbytes = (1 if cfg.quick else 10) * 1_000_000
    got = collect(cfg.repeat, {
        "orch": lambda: orch_logs(cfg, nbytes),
        "supervisor": lambda: supervisor_logs(cfg, nbytes),
        "cat": lambda: cat_logs(cfg, nbytes),
    }, cfg, "logs")
    return [Row(key="logs", family="logs",
                metric=f"Logs: {N} shards x {nbytes / 1e6:g} MB of stdout lines to files",
                unit="MiB/s", better="higher", orch=got.pop("orch"), limit=got.pop("cat"),
                limit_label="| cat > file", peers=got, target=100,
                note="orch adds a timestamp to every line and rotates at 10 MB; supervisor "
                     "writes the raw bytes")]
