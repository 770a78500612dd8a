"""Helpers for black-box tests of the real ``orch`` CLI with real processes.

- ``run_orch``: run the venv's ``orch`` to completion in its own cwd and home.
- ``start_orch``: start ``orch`` in the background (for signal tests).
- ``poll_for``: wait on a condition with a deadline; tests never sleep to wait
  for a process (circus ``tests/support.py``).
- ``run_pids``: live processes whose environment carries a given
  ``ORCH_RUN_ID`` (read from /proc/*/environ), grandchildren included.

Every test gets its own home (``ORCH_HOME``) and cwd under ``tmp_path``, and
every process a test's run left behind is killed (by pid) at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

BIN = Path(sys.executable).parent
ORCH = str(BIN / "orch")
if not os.path.exists(ORCH):
    raise RuntimeError(f"no {ORCH}: install orch in this interpreter's environment first")
PYTHON = sys.executable

T = TypeVar("T")


def orch_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an ``orch`` process: ours minus any ORCH_*, plus ORCH_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["ORCH_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_orch(
    *args: str,
    cwd: Path,
    home: Path,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``orch ARGS`` to completion; text output (undecodable bytes replaced)."""
    return subprocess.run(
        [ORCH, *args],
        cwd=cwd,
        env=orch_env(home, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def start_orch(
    *args: str, cwd: Path, home: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``orch ARGS`` in the background, stdout/stderr to files in cwd."""
    out = open(cwd / "orch.stdout", "w")  # noqa: SIM115 - closed by the OS at exit
    err = open(cwd / "orch.stderr", "w")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [ORCH, *args], cwd=cwd, env=orch_env(home, env), stdin=subprocess.DEVNULL,
            stdout=out, stderr=err, text=True,
        )
    finally:
        out.close()
        err.close()


def poll_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """The first truthy value of ``predicate()`` within ``timeout`` s, else the last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)  # allowed-sleep: poll interval of poll_for itself


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, a zombie, or not ours
        return b""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "X"
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def run_pids(run_id: str, home: Path | None = None) -> list[int]:
    """Live (not zombie) processes whose environment has ``ORCH_RUN_ID=run_id``
    (and ``ORCH_HOME=home`` when given, so another test's run can never match)."""
    needles = [b"ORCH_RUN_ID=" + run_id.encode()]
    if home is not None:
        needles.append(b"ORCH_HOME=" + str(home).encode())
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        environ = _environ(pid).split(b"\0")
        if all(n in environ for n in needles) and _state(pid) not in ("Z", "X"):
            pids.append(pid)
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def run_ids(home: Path) -> list[str]:
    runs = home / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


def only_run_id(home: Path) -> str:
    ids = run_ids(home)
    assert len(ids) == 1, ids
    return ids[0]


def status_json(run: str | None, *, cwd: Path, home: Path) -> Any:
    args = ["status", "--json"] if run is None else ["status", run, "--json"]
    proc = run_orch(*args, cwd=cwd, home=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_id(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in detail["shards"]}


class Env:
    """One test's world: a cwd, a home, and the runs started in it."""

    def __init__(self, root: Path) -> None:
        self.cwd = root / "work"
        self.home = root / "home"
        self.cwd.mkdir()
        self.procs: list[subprocess.Popen[str]] = []

    def orch(
        self, *args: str, timeout: float = 30.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return run_orch(*args, cwd=self.cwd, home=self.home, timeout=timeout, **kw)

    def start(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        proc = start_orch(*args, cwd=self.cwd, home=self.home, **kw)
        self.procs.append(proc)
        return proc

    def status(self, run: str | None = None) -> Any:
        return status_json(run, cwd=self.cwd, home=self.home)

    def run_id(self) -> str:
        return only_run_id(self.home)

    def script(self, name: str, text: str) -> str:
        path = self.cwd / name
        path.write_text(text)
        return str(path)

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.cwd / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def cleanup(self) -> None:
        """Kill, by pid, whatever our runs left: first the orch masters, then their processes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for run_id in run_ids(self.home):
            for pid in run_pids(run_id, self.home):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = Env(tmp_path)
    try:
        yield world
    finally:
        world.cleanup()
