"""``python -m orchestrator.daemon RUN_DIR``: the detached master.

Started by ``launch`` for ``orch run -d`` and ``orch resume -d`` in a new
session, with the run lock handed over as ``--lock-fd``; it writes its pid
to ``master.pid`` and supervises the run with plain status lines in
``master.log``.
"""

from __future__ import annotations

import os
import sys

from orchestrator.errors import RET_USAGE
from orchestrator.launch import supervise
from orchestrator.runs import OpenedRun, RunDir, private
from orchestrator.views.live import PlainView


def main(argv: list[str]) -> int:
    retry_failed = "--retry-failed" in argv
    argv = [a for a in argv if a != "--retry-failed"]
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--lock-fd"):
        print("usage: python -m orchestrator.daemon RUN_DIR [--lock-fd FD]", file=sys.stderr)
        return RET_USAGE
    run_dir = RunDir(argv[0])
    lock_fd = int(argv[2]) if len(argv) == 3 else run_dir.lock()
    if lock_fd is None:
        print(f"orch: {run_dir.path} is held by another master", file=sys.stderr)
        return RET_USAGE
    os.set_inheritable(lock_fd, False)  # attempts must never hold the run lock
    run = OpenedRun.load(run_dir, lock_fd=lock_fd)
    with open(run_dir.master_pid, "w", opener=private) as f:
        f.write(f"{os.getpid()}\n")
    try:
        return supervise(run, PlainView(tick_s=10.0), retry_failed=retry_failed)
    finally:
        run.store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
