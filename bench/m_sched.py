"""``orch serve``'s CPU with 50 scheduled tasks idle (target ≤ 0.2 % of a core).

    python -m bench.m_sched [--quick]

Two serves in turn on an empty home, no client: one with an orch.toml of 50
tasks (25 ``every = "1h"``, 25 cron ``0 3 * * *``: none due while measured),
one with the same 50 tasks unscheduled (the baseline: the hub's scan). Each
is measured from its schedstat CPU time over a window after a settling
pause; the figures are the percent of one core and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import ORCH, base_env, cpu_ns, launch

TASKS = 50


def _config(scheduled: bool) -> str:
    out = []
    for i in range(TASKS):
        out.append(f"[tasks.t{i}]\ncommand = {json.dumps(['true'])}\nsplit = 1\n")
        if scheduled:
            out.append('every = "1h"\n' if i % 2 else 'schedule = "0 3 * * *"\n')
    return "\n".join(out)


def _wait_line(path: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if f.read().count("\n") >= 2:
                return True
        time.sleep(0.05)  # allowed-sleep: poll for serve's first lines
    return False


def idle_cpu(scheduled: bool, settle_s: float, window_s: float) -> float:
    """Percent of one core used by an idle serve."""
    work = tempfile.mkdtemp(prefix="orch-bench-sched-")
    try:
        cfg = os.path.join(work, "orch.toml")
        with open(cfg, "w") as f:
            f.write(_config(scheduled))
        out = os.path.join(work, "serve.out")
        with open(out, "wb") as o:
            proc = launch(
                [
                    *ORCH,
                    "serve",
                    "--port",
                    "0",
                    "--no-auth",
                    "--config",
                    cfg,
                    "--home",
                    os.path.join(work, "home"),
                ],
                env=base_env(),
                cwd=work,
                stdout=o,
                stderr=subprocess.STDOUT,
            )
        try:
            if not _wait_line(out, 30):
                raise RuntimeError("orch serve did not start")
            time.sleep(settle_s)  # allowed-sleep: let start-up work finish before measuring
            c0, t0 = cpu_ns(proc.pid), time.monotonic()
            time.sleep(window_s)  # allowed-sleep: the measurement window itself
            c1, t1 = cpu_ns(proc.pid), time.monotonic()
            if c0 is None or c1 is None:
                raise RuntimeError("orch serve exited while measured")
            return 100.0 * (c1 - c0) / 1e9 / (t1 - t0)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 s windows instead of 60 s")
    args = ap.parse_args(argv)
    window = 10.0 if args.quick else 60.0
    base = idle_cpu(False, 5.0, window)
    sched = idle_cpu(True, 5.0, window)
    print(f"serve idle, 50 tasks unscheduled:  {base:.3f} % of a core")
    print(f"serve idle, 50 tasks scheduled:    {sched:.3f} % of a core (target <= 0.2 %)")
    print(f"cost of the schedules:             {sched - base:+.3f} % of a core")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
