"""Why start-up is worse than linear: a spawn's cost against the descriptors the parent holds.

    python bench/spawn_fds.py [SPAWNS]

Opens 0, 2,000, 4,000, 8,000 and 16,000 pipe ends (an orch master holds two per
live attempt), then ``posix_spawn``s SPAWNS ``sleep`` children and reports, min of
3 rounds: wall time per spawn, the parent's CPU per spawn (getrusage) and each
child's CPU until it sleeps (/proc/PID/schedstat, ns). The child's CPU is its
exec, which closes every close-on-exec descriptor it inherited; the parent's is
mostly the copy of its descriptor table at clone.
"""

from __future__ import annotations

import os
import resource
import sys
import time


def one(extra: int, n: int) -> tuple[float, float, float]:
    fds: list[int] = []
    for _ in range(extra // 2):
        fds += os.pipe()
    best = (1e9, 1e9, 1e9)
    for _ in range(3):
        pids = []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(n):
            pids.append(os.posix_spawn("/bin/sleep", ["sleep", "1000"], os.environ, setsid=True))
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        kids = 0
        for p in pids:
            with open(f"/proc/{p}/schedstat") as f:
                kids += int(f.read().split()[0])
        for p in pids:
            os.kill(p, 9)
        for p in pids:
            os.waitpid(p, 0)
        best = tuple(min(a, b) for a, b in zip(best, (wall / n, cpu / n, kids / n / 1e9),
                                                  strict=True))  # type: ignore[assignment]
    for fd in fds:
        os.close(fd)
    return best


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 400
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"{n} spawns per round, min of 3 (load {os.getloadavg()[0]:.1f}); µs per spawn:")
    print(f"{'open fds':>9} {'wall':>8} {'parent CPU':>11} {'child CPU':>10}")
    for extra in (0, 2000, 4000, 8000, 16000):
        if extra + 64 > hard:
            break
        wall, cpu, kid = one(extra, n)
        print(f"{extra:9,d} {wall * 1e6:8.0f} {cpu * 1e6:11.0f} {kid * 1e6:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
