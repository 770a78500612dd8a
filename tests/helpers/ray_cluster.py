"""Helpers of the Ray suite: a real two-node Ray cluster on this machine.

``cluster`` (session fixture, in conftest.py) starts it with ``ray start``
twice, each node with its own temp dir, node-manager port and custom
resource (``nodeA``, ``nodeB``), and ``ray stop --force`` at the end. Node
death is made quick to detect (health checks every 0.5 s, 4 misses) so the
node-loss test waits seconds, not Ray's default ~15 s.

The shard used here (``WORK``) writes one line per item to
``$ITEMS_DIR/<shard>.items`` ("<attempt> <item>"), and one line
"<attempt> cp <n>" after each acknowledged checkpoint, so a test can tell
exactly which items were done by which attempt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

#: Node death detected in ~2 s instead of Ray's default ~15 s (docs/scale-out.md).
FAST_HEALTH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_USAGE_STATS_ENABLED": "0",
}

WORK = """\
import os, time
import shards

me = shards.info()
n = int(os.environ.get("ITEMS", "20"))
every = int(os.environ.get("CHECKPOINT_EVERY", "5"))
pause = float(os.environ.get("ITEM_S", "0.05"))
start = shards.last_checkpoint() or 0
path = os.path.join(os.environ["ITEMS_DIR"], me.shard_id + ".items")
shards.progress(start, n)
for i in range(start, n):
    time.sleep(pause)  # allowed-sleep: simulated work per item
    with open(path, "a") as f:
        f.write(f"{me.attempt} {i}\\n")
    shards.advance()
    if (i + 1) % every == 0 and i + 1 < n:
        shards.checkpoint(i + 1)
        with open(path, "a") as f:
            f.write(f"{me.attempt} cp {i + 1}\\n")
print("node", os.environ.get("ORCH_NODE"), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A local Ray cluster started by the tests; ``address`` is HOST:PORT of its head."""

    root: Path
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    node_ports: dict[str, int] = field(default_factory=dict)

    def ray(self, *args: str, timeout: float = 120.0) -> None:
        proc = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"ray {' '.join(args)}: {proc.stdout}\n{proc.stderr}"

    def start_head(self, name: str) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start(name, "--head", f"--port={port}", "--include-dashboard=false")

    def add_node(self, name: str) -> None:
        self._start(name, f"--address={self.address}")

    def _start(self, name: str, *args: str) -> None:
        temp = self.root / name
        temp.mkdir()
        nm_port = free_port()
        self.ray(
            "start",
            *args,
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            f'--resources={{"{name}": 2}}',
            f"--temp-dir={temp}",
            f"--node-manager-port={nm_port}",
            "--disable-usage-stats",
        )
        self.node_ports[name] = nm_port

    def raylet(self, name: str) -> psutil.Process:
        flag = f"--node_manager_port={self.node_ports[name]}"
        for proc in psutil.process_iter(["cmdline"]):
            if flag in (proc.info["cmdline"] or []):
                return proc
        raise AssertionError(f"no raylet for node {name}")

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's raylet and every process under it (workers, shards)."""
        raylet = self.raylet(name)
        procs = [raylet, *raylet.children(recursive=True)]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in procs]

    def node_id(self, name: str) -> str:
        """The Ray node id of the live node started as ``name`` (from its custom resource).

        Asked in a child process, so the test process never becomes a Ray driver.
        """
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([[n['NodeID'], n['Alive'], n['Resources']] for n in ray.nodes()]))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        for node_id, alive, resources in json.loads(proc.stdout.strip().splitlines()[-1]):
            if alive and name in resources:
                return str(node_id)
        raise AssertionError(f"no live node {name}: {proc.stdout}")

    def named_actors(self) -> list[str]:
        """Names of the live named actors in namespace ``orch`` (asked in a child process)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps(sorted(a['name'] for a in "
            "ray.util.list_named_actors(all_namespaces=True) if a['namespace'] == 'orch')))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout.strip().splitlines()[-1]))

    def workers(self, name: str) -> set[int]:
        """Pids of the Ray worker processes running orch's host actors on node ``name``."""
        pids = set()
        for proc in self.raylet(name).children(recursive=True):
            try:
                title = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if title and title[0].startswith("ray::HostActor"):
                pids.add(proc.pid)
        return pids

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


def items_by_attempt(path: Path) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(attempt -> items done, attempt -> checkpoints acknowledged) from a shard's file."""
    items: dict[int, list[int]] = {}
    cps: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            cps.setdefault(int(parts[0]), []).append(int(parts[2]))
        else:
            items.setdefault(int(parts[0]), []).append(int(parts[1]))
    return items, cps


def env_without_orch() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
