"""The Ray backend (issue 13), side by side with the local backend on this machine.

    python -m bench.m_ray [--shards 100] [--repeat 3] [--default-health]
    python -m bench --only ray     # the same rows in the table of docs/performance.md

Starts its own two-node Ray cluster on 127.0.0.1 (``ray start`` twice, own
temp dirs, ``ray stop --force`` at the end) and prints:

1. start-up: ``orch run --split N -- sleep`` until all N sleeps exist, with
   ``--backend ray --shard-cpus 0`` and with the local backend;
2. heartbeat ingest over CURVE TCP from 100 DEALER sockets (two sender
   processes) into the master's real ``Channel``, beside the same over ipc;
3. node death to re-placement: a node added for the measure has its raylet
   and everything under it SIGKILLed; time until its shards run again on the
   other nodes, beside the time until orch declared them lost (Ray's
   detection: ``--default-health`` keeps Ray's default ~15 s, else 0.5 s x 4
   health checks as in the tests). The loss and the next attempt's start come
   from the run's own records (``attempts`` table); "running again" is what
   ``orch status`` sampling saw;
4. RSS of the run's host actor processes, divided by the shards they run.

Each measure runs ``--repeat`` times; the summary gives min–max and the load
average around the runs (the machine is shared: absolute figures are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

PY = sys.executable
BIN = Path(PY).parent
ORCH = str(BIN / "orch")
RAY = str(BIN / "ray")
FAST_HEALTH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_health_check_initial_delay_ms": "1000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path, fast: bool, extra: dict[str, str]) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.env.update(extra)
        if fast:
            self.env.update(FAST_HEALTH)
        self.ports: dict[str, int] = {}
        self.address = f"127.0.0.1:{free_port()}"
        self._start("nodeA", "--head", f"--port={self.address.split(':')[1]}",
                    "--include-dashboard=false")  # fmt: skip
        self._start("nodeB", f"--address={self.address}")

    def _start(self, name: str, *args: str) -> None:
        temp = self.root / name
        temp.mkdir()
        self.ports[name] = free_port()
        subprocess.run(
            [RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=2",
             f'--resources={{"{name}": 2}}', f"--temp-dir={temp}",
             f"--node-manager-port={self.ports[name]}", "--disable-usage-stats"],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip

    def raylet(self, name: str) -> psutil.Process:
        flag = f"--node_manager_port={self.ports[name]}"
        return next(
            p for p in psutil.process_iter(["cmdline"]) if flag in (p.info["cmdline"] or [])
        )

    def kill(self, name: str) -> float:
        raylet = self.raylet(name)
        procs = [raylet, *raylet.children(recursive=True)]
        t = time.monotonic()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return t

    def add(self, name: str) -> None:
        self._start(name, f"--address={self.address}")

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True)


def sleeps(marker: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) == 2 and cmd[1] == marker and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(proc)
    return out


def startup(n: int, backend: list[str], home: Path, env: dict[str, str]) -> tuple[float, Any]:
    """Seconds from launching orch to n sleeps running; the orch process (still running)."""
    marker = f"{1000 + (time.time_ns() % 100_000) / 1e6:.6f}"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [ORCH, "run", "--home", str(home), "--split", str(n), "--jobs", str(n), *backend,
         "--", "sleep", marker],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = t0 + 300
    while len(sleeps(marker)) < n:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(
                f"{len(sleeps(marker))}/{n} running after {time.monotonic() - t0:.0f}s"
            )
        time.sleep(0.01)  # allowed-sleep: poll interval
    return time.monotonic() - t0, (proc, marker)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def actor_rss(roots: list[psutil.Process]) -> tuple[int, int]:
    """(host actor processes under the cluster's raylets, their summed RSS in bytes)."""
    procs = []
    for root in roots:
        for p in root.children(recursive=True):
            try:
                if (p.cmdline() or [""])[0].startswith("ray::HostActor"):
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return len(procs), total


SENDER = """
import sys, time, zmq
from shards import protocol as p
endpoint, server, public, secret, n, seconds, first = sys.argv[1:]
ctx = zmq.Context()
socks = []
for i in range(int(n)):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 1000)
    if server != "-":
        s.setsockopt(zmq.CURVE_SERVERKEY, server.encode())
        s.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
        s.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
    s.connect(endpoint)
    msg = p.Message(p.Kind.HEARTBEAT, "bench", str(int(first) + i), 1, 1, 1, 100)
    socks.append((s, p.encode(msg)))
time.sleep(0.5)
end = time.monotonic() + float(seconds)
sent = 0
while time.monotonic() < end:
    for s, frame in socks:
        try:
            s.send(frame, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            pass
print(sent)
"""


def ingest(curve_on: bool, tmp: Path, shards: int = 100, seconds: float = 3.0) -> float:
    """Messages a second the master's channel takes in from ``shards`` DEALERs."""
    from orchestrator import curve
    from orchestrator.channel import SOCKET_OPTIONS, Channel
    from orchestrator.loop import Loop

    loop = Loop()
    count = [0]

    def on_message(identity: bytes, msg: Any) -> None:
        count[0] += 1

    def on_heartbeat(identity: bytes, beat: Any, now: float) -> None:
        count[0] += 1

    d = tmp / ("curve" if curve_on else "ipc")
    d.mkdir()
    close_zap = None
    if curve_on:
        keys = curve.load_or_create_keys(str(d))
        sock, endpoint, close_zap = curve.bind_curve(
            loop, keys, "127.0.0.1", 0, "127.0.0.1", SOCKET_OPTIONS
        )
        channel = Channel(loop, str(d / "x"), "bench", bound=(sock, endpoint))
        creds = [keys.server_public.decode(), keys.client_public.decode(),
                 keys.client_secret.decode()]  # fmt: skip
    else:
        channel = Channel(loop, str(d / "hb.sock"), "bench")
        creds = ["-", "-", "-"]
    channel.bind(on_message, on_heartbeat)
    half = shards // 2
    senders = [
        subprocess.Popen(
            [PY, "-c", SENDER, channel.endpoint, *creds, str(half), str(seconds), str(i * half)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    # Count from the first message to the senders' end.
    while count[0] == 0:
        loop.run_once(0.05)
    t0, c0 = time.monotonic(), count[0]
    while all(s.poll() is None for s in senders):
        loop.run_once(0.05)
    t1, c1 = time.monotonic(), count[0]
    for s in senders:
        s.wait()
    channel.close()
    if close_zap is not None:
        close_zap()
    loop.close()
    return (c1 - c0) / (t1 - t0)


WORK = """
import os, time, shards
start = shards.last_checkpoint() or 0
shards.progress(start, 10_000)
for i in range(start, 10_000):
    time.sleep(0.05)
    shards.advance()
    if i % 20 == 19:
        shards.checkpoint(i + 1)
"""


def node_death(
    cluster: Cluster, victim: str, home: Path, env: dict[str, str], tmp: Path
) -> dict[str, float]:
    cluster.add(victim)
    work = tmp / "work.py"
    work.write_text(WORK)
    proc = subprocess.Popen(
        [ORCH, "run", "--home", str(home), "--backend", "ray", "--ray-address", cluster.address,
         "--split", "6", "--jobs", "6", "--shard-cpus", "0.5", "--backoff-initial", "0.1s",
         "--heartbeat-timeout", "60s", "--", PY, str(work)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def status() -> dict[str, Any]:
        runs = sorted((home / "runs").iterdir())
        out = subprocess.run([ORCH, "status", "--home", str(home), runs[-1].name, "--json"],
                             capture_output=True, text=True, env=env)  # fmt: skip
        return dict(json.loads(out.stdout))

    while True:
        time.sleep(0.2)  # allowed-sleep: poll interval
        if (home / "runs").exists():
            shards = status()["shards"]
            if all(s["state"] == "running" and (s["done"] or 0) > 20 for s in shards):
                break
    raylet_args = cluster.raylet(victim).cmdline()
    dead = next(a.split("=", 1)[1] for a in raylet_args if a.startswith("--node_id="))
    victims = {s["id"] for s in shards if s["node"] == dead}
    if not victims:
        stop(proc)
        raise RuntimeError(f"no shard was placed on {victim}")
    t_kill = cluster.kill(victim)
    wall_kill = time.time()
    lost_at = replaced_at = None
    while replaced_at is None and time.monotonic() - t_kill < 180:
        time.sleep(0.05)  # allowed-sleep: poll interval
        moved = [s for s in status()["shards"] if s["id"] in victims]
        if lost_at is None and any(s["attempts"] > 1 or s["state"] != "running" for s in moved):
            lost_at = time.monotonic()
        if all(s["state"] == "running" and s["node"] not in (dead, None) for s in moved):
            replaced_at = time.monotonic()
    # orch's own records: when it declared each victim's attempt lost (Ray's detection,
    # seen by the master) and when it started the next attempt.
    run_dir = sorted((home / "runs").iterdir())[-1]
    db = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT s.id, a.attempt, a.started_at, a.ended_at, a.reason FROM attempts a"
        " JOIN shards s ON s.idx = a.shard_idx"
    ).fetchall()
    db.close()
    stop(proc)
    lost = [r[3] for r in rows if r[0] in victims and (r[4] or "").startswith("node lost")]
    again = [r[2] for r in rows if r[0] in victims and r[1] == 2]
    return {
        "lost_s": (lost_at or float("nan")) - t_kill,
        "replaced_s": (replaced_at or float("nan")) - t_kill,
        "lost_rec_s": (max(lost) if lost else float("nan")) - wall_kill,
        "again_rec_s": (max(again) if len(again) == len(victims) else float("nan")) - wall_kill,
    }


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(
    n: int, repeat: int, parts: set[str], default_health: bool, say: Any = print
) -> dict[str, list[float]]:
    """Every figure of every part, ``repeat`` times each: name -> samples."""
    got: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        got.setdefault(name, []).append(value)

    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-ray-", dir="/tmp"))
    try:
        if "ingest" in parts:
            for _ in range(repeat):
                sub = Path(tempfile.mkdtemp(dir=tmp))
                add("ingest_curve", ingest(True, sub))
                add("ingest_ipc", ingest(False, sub))
                say(f"  ingest: CURVE TCP {got['ingest_curve'][-1]:,.0f} msg/s, ipc "
                    f"{got['ingest_ipc'][-1]:,.0f} msg/s (load {load()})")  # fmt: skip
        if parts & {"startup", "death"}:
            cluster = Cluster(tmp, fast=not default_health, extra={})
            env = dict(cluster.env)
            try:
                for r in range(repeat if "startup" in parts else 0):
                    home = tmp / f"home{r}"
                    t_local, (p_local, _) = startup(n, [], home, env)
                    stop(p_local)
                    ray_args = ["--backend", "ray", "--ray-address", cluster.address,
                                "--shard-cpus", "0"]  # fmt: skip
                    t_ray, (p_ray, _) = startup(n, ray_args, home, env)
                    roots = [cluster.raylet(name) for name in ("nodeA", "nodeB")]
                    hosts, rss = actor_rss(roots)
                    stop(p_ray)
                    add("startup_ray", t_ray)
                    add("startup_local", t_local)
                    add("actor_mib_per_shard", rss / n / 2**20)
                    say(f"  start-up: ray {t_ray:.2f} s, local {t_local:.2f} s; {hosts} host "
                        f"actors, {rss / 2**20:.1f} MiB in all (load {load()})")  # fmt: skip
                for r in range(repeat if "death" in parts else 0):
                    death = node_death(cluster, f"nodeC{r}", tmp / f"death{r}", env, tmp)
                    for key, value in death.items():
                        add(key, value)
                    say(f"  node death: recorded lost {death['lost_rec_s']:.2f} s after the "
                        f"kill, next attempt {death['again_rec_s']:.2f} s, seen running "
                        f"{death['replaced_s']:.2f} s (load {load()})")  # fmt: skip
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return got


def rows(got: dict[str, list[float]], n: int, default_health: bool) -> list[Any]:
    """The figures as rows of ``python -m bench``'s table (family ``ray``)."""
    from bench.common import Row, cell

    health = "Ray's default health checks" if default_health else "health checks 0.5 s x 4"
    out = []
    if "startup_ray" in got:
        out.append(Row(
            key="ray_startup", family="ray", unit="s", better="lower",
            metric=f"Ray backend: {n} sleeps running on a two-node local cluster",
            orch=cell(got["startup_ray"]), limit=cell(got["startup_local"]),
            limit_label="local backend", target=5.0,
            note="includes joining the cluster as a driver and starting one host actor per "
                 "node; the local backend of the same round is the limit column"))
        out.append(Row(
            key="ray_actor_rss", family="ray", unit="MiB", better="lower",
            metric=f"Ray backend: host actor RSS per shard ({n} shards, 2 nodes)",
            orch=cell(got["actor_mib_per_shard"])))
    if "ingest_curve" in got:
        out.append(Row(
            key="ray_ingest", family="ray", unit="msg/s", better="higher",
            metric="Ray backend: heartbeat ingest, 100 DEALERs over CURVE TCP",
            orch=cell(got["ingest_curve"]), limit=cell(got["ingest_ipc"]),
            limit_label="the same over ipc", target=50_000))
    if "lost_rec_s" in got:
        after = [a - lo for a, lo in zip(got["again_rec_s"], got["lost_rec_s"], strict=True)]
        seen = [r - lo for r, lo in zip(got["replaced_s"], got["lost_rec_s"], strict=True)]
        out.append(Row(
            key="ray_node_lost", family="ray", unit="s", better="lower",
            metric=f"Ray backend: node killed until its shards are declared lost ({health})",
            orch=cell(got["lost_rec_s"]), note="Ray's detection; orch's own record"))
        out.append(Row(
            key="ray_replaced", family="ray", unit="s", better="lower",
            metric="Ray backend: node loss detected until the next attempts started elsewhere",
            orch=cell(after), target=2.0, note="from the run's attempt records"))
        out.append(Row(
            key="ray_seen_running", family="ray", unit="s", better="lower",
            metric="Ray backend: node loss detected until orch status shows them running",
            orch=cell(seen), target=2.0, note="orch status sampled every ~0.1 s"))
    return out


def ray(cfg: Any) -> list[Any]:
    """``python -m bench --only ray``: the rows above (skipped without Ray)."""
    from bench.common import Row, cell, log

    if shutil.which(RAY) is None and not Path(RAY).exists():
        return [Row(key="ray_startup", family="ray", unit="s", better="lower",
                    metric="Ray backend", orch=cell(text="skipped (pip install '.[ray]')"))]
    n = 20 if cfg.quick else 100
    got = measure(n, cfg.repeat, {"startup", "ingest", "death"}, False,
                  say=lambda line: log(cfg, line.strip()))  # fmt: skip
    return rows(got, n, False)


def main() -> None:
    from bench import report

    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--default-health", action="store_true")
    ap.add_argument("--only", default="startup,ingest,death", help="comma-separated parts")
    args = ap.parse_args()
    before = load()
    got = measure(args.shards, args.repeat, set(args.only.split(",")), args.default_health,
                  say=lambda line: print(line, flush=True))  # fmt: skip
    print(f"load average (1/5/15 min) before: {before}, after: {load()}")
    print(report.render_text(rows(got, args.shards, args.default_health)))


if __name__ == "__main__":
    main()
