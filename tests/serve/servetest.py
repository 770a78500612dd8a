"""Helpers for the ``orch serve`` suites: a real server on 127.0.0.1, real runs, real HTTP.

One server (``Served``) is shared by a session: it serves its own home and an
orch.toml with a few tasks whose shards are small Python scripts. Runs are
started with ``orch run -d`` (or through the API), and everything they left
is killed by pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

PYTHON = sys.executable
TOKEN = "test-token-0123456789"
SECRET = "s3cr3t-value-never-shown-9f2c"
T = TypeVar("T")

WORK = r"""
import json, os, sys, time
index, n, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else ""
fail = mode == "fail"
print(f"shard {index} starting, attempt {os.environ.get('ORCH_ATTEMPT')}", flush=True)
for k in range(1, n + 1):
    print("##orch " + json.dumps({"done": k, "total": n}), flush=True)
    time.sleep(delay)  # allowed-sleep: simulated work of a shard
    if mode == "early" and index % 37 == 1 and k == 3 + index % 5:
        print(f"Traceback (most recent call last):\n  File \"crawl.py\", line 88", file=sys.stderr)
        print(f"ConnectionError: merchant {index}: HTTP 503 after 3 retries", file=sys.stderr)
        sys.exit(1)
if fail and index == 1:
    print("something broke in shard 1", file=sys.stderr, flush=True)
    sys.exit(3)
print(f"shard {index} finished", flush=True)
"""


def poll_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """The first truthy value of ``predicate()`` within ``timeout`` s, else the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)  # allowed-sleep: poll interval of poll_for itself


def orch_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["ORCH_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def config_text(work: Path) -> str:
    cmd = [PYTHON, str(work)]
    q = json.dumps
    return f"""
[tasks.quick]
command = {q([*cmd, "{index}", "3", "0.05"])}
split = 3

[tasks.pages]
command = {q([*cmd, "{index}", "1", "0"])}
split = 25
jobs = 25

[tasks.steady]
command = {q([*cmd, "{index}", "10", "0.3"])}
split = 12
jobs = 12

[tasks.slow]
command = {q([*cmd, "{index}", "600", "0.1"])}
split = 4
jobs = 4
stop_timeout = "2s"

[tasks.medium]
command = {q([*cmd, "{index}", "12", "0.15", "fail"])}
split = 12
jobs = 12
max_restarts = 0

[tasks.hundred]
command = {q([*cmd, "{index}", "300", "0.1", "early"])}
split = 100
jobs = 60
max_restarts = 0
stop_timeout = "2s"

[tasks.secret]
command = {q([*cmd, "{index}", "2", "0.05"])}
split = 2
env = {{ API_KEY = "{SECRET}" }}
"""


class Served:
    """A running ``orch serve`` and the world it serves."""

    def __init__(
        self, root: Path, *extra: str, token_flag: bool = True, env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.home = root / "home"
        self.cwd = root / "work"
        self.cwd.mkdir(parents=True, exist_ok=True)
        work = self.cwd / "work.py"
        work.write_text(WORK)
        self.config = self.cwd / "orch.toml"
        self.config.write_text(config_text(work))
        self.out = open(root / "serve.out", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "orchestrator",
                "serve",
                "--port",
                "0",
                "--config",
                str(self.config),
                "--home",
                str(self.home),
                *(["--token", TOKEN] if token_flag else []),
                *extra,
            ],
            cwd=self.cwd,
            env=orch_env(self.home, env),
            stdin=subprocess.DEVNULL,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = poll_for(self._first_line, timeout=60)
        assert first, f"orch serve printed nothing: {self.output()}"
        self.first_line = first
        self.url = first.split("orch serve: ", 1)[1].strip()
        self.base = self.url.split("/?", 1)[0]
        self.port = int(self.base.rsplit(":", 1)[1])
        self.client = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        assert poll_for(self._healthy, timeout=60), self.output()

    def _first_line(self) -> str | None:
        self.out.flush()
        text = (self.root / "serve.out").read_text()
        if "\n" in text:
            return text.split("\n", 1)[0]
        assert self.proc.poll() is None, f"orch serve exited: {text}"
        return None

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return (self.root / "serve.out").read_text()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(path, **kw)

    def orch(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "orchestrator", *args],
            cwd=self.cwd,
            env=orch_env(self.home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, task: str, *args: str) -> str:
        """``orch run TASK --config FILE -d``: the run id."""
        proc = self.orch("run", task, "--config", str(self.config), "-d", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.get(f"/api/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def wait_state(self, run_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        run = poll_for(lambda: (r := self.run(run_id))["state"] in states and r, timeout=timeout)
        assert run, f"run {run_id} never reached {states}: {self.run(run_id)['state']}"
        return run

    def wait_running(self, run_id: str, n: int, timeout: float = 60) -> dict[str, Any]:
        """Until ``n`` shards of the run are running (and the run too)."""

        def ok() -> dict[str, Any] | None:
            r = self.run(run_id)
            return r if r["counts"].get("running", 0) >= n and r["state"] == "running" else None

        run = poll_for(ok, timeout=timeout)
        assert run, self.run(run_id)
        return run

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.out.close()
        kill_runs(self.home)


def kill_runs(home: Path) -> None:
    """Kill, by pid, every process that carries one of this home's run ids."""
    runs = home / "runs"
    if not runs.exists():
        return
    ids = {p.name for p in runs.iterdir()}
    needle = b"ORCH_HOME=" + str(home).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        run_vars = [e for e in environ if e.startswith(b"ORCH_RUN_ID=")]
        if needle in environ or any(e.split(b"=", 1)[1].decode() in ids for e in run_vars):
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
    # detached masters carry neither variable; they are found by their run directory
    for run_dir in runs.iterdir():
        try:
            pid = int((run_dir / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(run_dir).encode() not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
