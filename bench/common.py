"""Shared helpers: result cells and rows, /proc readers, process launching and cleanup.

The bench process makes itself a child subreaper, so every process any
benchmark starts (a pm2 daemon that double-forks, the orch master of a
detached run, orphans of a killed master) stays its descendant; ``cleanup``
kills that whole tree, whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
_ORCH_BIN = os.path.join(os.path.dirname(PY), "orch")
ORCH = [_ORCH_BIN] if os.access(_ORCH_BIN, os.X_OK) else [PY, "-m", "orchestrator"]
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = "/bin/sh"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


# --- results -----------------------------------------------------------------


class Skip(Exception):
    """A contender that cannot be measured; the text is shown in its cell."""


@dataclass
class Cell:
    """One figure: several samples (median, min-max shown) or a text such as 'skipped'."""

    samples: list[float] = field(default_factory=list)
    text: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.samples) and self.text is None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"text": self.text or "n/a", "note": self.note}
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples),
                "samples": self.samples, "note": self.note}


def cell(samples: list[float] | float | None = None, text: str | None = None,
         note: str = "") -> Cell:
    if isinstance(samples, int | float):
        samples = [float(samples)]
    return Cell(samples=list(samples or []), text=text, note=note)


SKIPPED = "skipped (not installed)"


@dataclass
class Row:
    """One line of the table."""

    key: str
    family: str
    metric: str
    unit: str
    better: str  # "lower" or "higher"
    orch: Cell
    peers: dict[str, Cell] = field(default_factory=dict)
    limit: Cell | None = None
    limit_label: str = ""
    target: float | None = None
    #: a target given as a ratio to the limit column (orch / limit for "lower", limit /
    #: orch for "higher"), judged on the medians of the same run
    target_x_limit: float | None = None
    note: str = ""

    def best_peer(self) -> tuple[str, Cell] | None:
        ok = [(n, c) for n, c in self.peers.items() if c.ok]
        if not ok:
            return None
        pick = min if self.better == "lower" else max
        return pick(ok, key=lambda nc: nc[1].median)

    def advantage(self, other: Cell | None) -> float | None:
        """How many times better orch is than ``other`` (> 1: orch ahead)."""
        if other is None or not other.ok or not self.orch.ok:
            return None
        a, b = self.orch.median, other.median
        if a == b:
            return 1.0
        if a <= 0 or b <= 0:  # a zero figure: infinitely better, or worse
            better = (a < b) == (self.better == "lower")
            return float("inf") if better else 0.0
        return b / a if self.better == "lower" else a / b

    def x_limit(self) -> float | None:
        """How many times the limit orch takes (> 1: orch behind the limit)."""
        lim = self.advantage(self.limit)
        return 1 / lim if lim and lim != float("inf") else None

    def met(self) -> bool | None:
        if not self.orch.ok:
            return None
        verdicts = []
        if self.target is not None:
            m = self.orch.median
            verdicts.append(m <= self.target if self.better == "lower" else m >= self.target)
        if self.target_x_limit is not None:
            x = self.x_limit()
            if x is None:
                return None
            verdicts.append(x <= self.target_x_limit)
        return all(verdicts) if verdicts else None


@dataclass
class Config:
    quick: bool
    repeat: int
    workdir: str
    verbose: bool = False

    def sub(self, name: str) -> str:
        path = tempfile.mkdtemp(prefix=name + "-", dir=self.workdir)
        return path


def log(cfg: Config | None, text: str) -> None:
    print(f"  · {text}", file=sys.stderr, flush=True)


def collect(repeat: int, contenders: dict[str, Callable[[], float | None]],
            cfg: Config | None = None, what: str = "") -> dict[str, Cell]:
    """Run each contender ``repeat`` times, alternating (order rotated each round)."""
    names = list(contenders)
    out: dict[str, Cell] = {n: Cell() for n in names}
    for r in range(repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c = out[name]
            if c.text is not None:
                continue
            try:
                value = contenders[name]()
            except Skip as exc:
                c.text = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one contender's failure is shown, not fatal
                c.text = f"error: {str(exc)[:60]}"
                log(cfg, f"{what} {name}: {exc!r}")
                continue
            finally:
                cleanup_orphans()
            if value is None:
                c.text = "n/a"
            else:
                c.samples.append(float(value))
            log(cfg, f"{what} {name} #{r + 1}: {value if value is None else round(value, 4)}")
    return out


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


# --- /proc -----------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    lp, rp = raw.find(b"("), raw.rfind(b")")
    rest = raw[rp + 2:].split()
    return raw[lp + 1:rp].decode(errors="replace"), rest[0].decode(), int(rest[1])


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid``."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def running(root: int, comm: str = "sleep") -> list[int]:
    """Live (not zombie) processes named ``comm`` below ``root``; not searched below them."""
    found: list[int] = []
    todo = [root]
    while todo:
        for kid in children(todo.pop()):
            st = proc_stat(kid)
            if st is None or st[1] in ("Z", "X"):
                continue
            if st[0] == comm:
                found.append(kid)
            else:
                todo.append(kid)
    return found


def cpu_ns(pid: int) -> int | None:
    """CPU time of all live threads of ``pid`` in ns (schedstat: ns, not 10 ms ticks)."""
    total, seen = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
                seen = True
        except (OSError, ValueError, IndexError):
            continue
    return total if seen else None


def status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mib(pid: int) -> float | None:
    kb = status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def wait_for(pred: Callable[[], Any], timeout_s: float, every_s: float = 0.002) -> float | None:
    """Seconds until ``pred()`` is truthy (polled), or None after ``timeout_s``."""
    t0 = time.perf_counter()
    while True:
        if pred():
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            return None
        time.sleep(every_s)


# --- launching and cleanup --------------------------------------------------------------

_popen_pids: set[int] = set()


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def launch(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
           stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL,
           stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so a killpg reaches its group)."""
    proc = subprocess.Popen(argv, env=env if env is not None else base_env(), cwd=cwd,
                            stdin=stdin, stdout=stdout,
                            stderr=stderr, start_new_session=True)
    _popen_pids.add(proc.pid)
    return proc


#: Not passed on to the managers: a session that sets PYTHONDONTWRITEBYTECODE makes every
#: Python manager (orch, supervisor, circus) compile its modules at every start, which no
#: user's installation does.
DROPPED_ENV = ("PYTHONDONTWRITEBYTECODE",)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ORCH_") and k not in DROPPED_ENV}
    env.update(extra)
    return env


def warm_bytecode() -> None:
    """Compile orch's modules once (as an installation does), so no figure pays for it."""
    env = base_env()
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "orchestrator"),
                    str(REPO / "shards")], env=env, check=False, capture_output=True)


def run_cmd(argv: list[str], timeout_s: float = 60.0, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env if env is not None else base_env(), cwd=cwd,
                          capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def cleanup_orphans() -> None:
    """Reap zombies re-parented to us (never the Popen children: their owner waits)."""
    for kid in children(os.getpid()):
        st = proc_stat(kid)
        if st is not None and st[1] == "Z" and kid not in _popen_pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(kid, os.WNOHANG)


def kill_tree(root: int, *, include_root: bool = True, timeout_s: float = 10.0) -> None:
    """SIGSTOP-free teardown: SIGKILL ``root`` and every descendant, then wait them gone."""
    pids = descendants(root)
    if include_root:
        pids.insert(0, root)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # Processes that forked during the sweep, or were re-parented to us meanwhile.
    for pid in descendants(root) if include_root is False else []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.01)
    cleanup_orphans()


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill a launched manager and everything below it, then reap it."""
    if proc is None:
        return
    kill_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _popen_pids.discard(proc.pid)
    cleanup_orphans()


def kill_everything() -> None:
    """Last resort at exit: every process below the bench, whatever it is."""
    for _ in range(3):
        pids = descendants(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def managed(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        stop(proc)


def kill_master_timed(mgr: int, pids: list[int], timeout_s: float = 60.0) -> float:
    """SIGKILL the master ``mgr``; seconds until every one of ``pids`` is gone (Skip if not)."""
    t0 = time.perf_counter()
    os.kill(mgr, signal.SIGKILL)
    left = pids
    while left and time.perf_counter() - t0 < timeout_s:
        left = [p for p in left if alive(p)]
        time.sleep(0.005)  # allowed-sleep: /proc polling interval
    if left:
        raise Skip(f"error: {len(left)} attempts alive {timeout_s:g} s after the master's SIGKILL")
    return time.perf_counter() - t0
