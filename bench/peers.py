"""Starting a fleet of N identical children under orch or a peer, and tearing it down.

Every manager is launched by the bench itself and measured from that launch.
Children are counted through /proc below the manager (``common.running``).
Peers live in the separate environment that bench/install_peers.sh builds
($BENCH_PEERS, default /tmp/bench-peers); one that is missing raises
``Skip(SKIPPED)`` and shows as "skipped (not installed)".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import orjson

from bench.common import (
    ORCH,
    PY,
    SKIPPED,
    Skip,
    base_env,
    children,
    kill_tree,
    launch,
    run_cmd,
    running,
    stop,
)

PEERS_DIR = os.environ.get("BENCH_PEERS", "/tmp/bench-peers")
PEER_NAMES = ("supervisor", "circus", "pm2", "parallel")


def _bin(name: str) -> str | None:
    for path in (os.path.join(PEERS_DIR, "venv", "bin", name),
                 os.path.join(PEERS_DIR, "npm", "bin", name)):
        if os.access(path, os.X_OK):
            return path
    return None


def peer_bin(peer: str) -> str | None:
    if peer == "supervisor":
        return _bin("supervisord")
    if peer == "circus":
        return _bin("circusd")
    if peer == "pm2":
        return _bin("pm2") if shutil.which("node") else None
    if peer == "parallel":
        path = shutil.which("parallel")
        if path is None:
            return None
        out = run_cmd([path, "--version"], 10).stdout
        return path if "GNU parallel" in out else None  # not moreutils' parallel
    raise ValueError(peer)


def require(peer: str) -> str:
    path = peer_bin(peer)
    if path is None:
        raise Skip(SKIPPED)
    return path


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    out["orch"] = run_cmd([*ORCH, "--version"], 20).stdout.strip().split()[-1]
    # Where the measured orch comes from: an editable install slows every Python start.
    where = run_cmd([PY, "-c", "import orchestrator; print(orchestrator.__file__)"], 20,
                    cwd="/").stdout.strip()
    out["orch"] += " (installed)" if "site-packages" in where else f" (editable: {where})"
    for peer in PEER_NAMES:
        path = peer_bin(peer)
        if path is None:
            out[peer] = SKIPPED
        elif peer in ("supervisor", "circus"):
            out[peer] = run_cmd([path, "--version"], 20).stdout.strip()
        elif peer == "pm2":
            pkg = os.path.join(PEERS_DIR, "npm", "lib", "node_modules", "pm2", "package.json")
            with open(pkg, "rb") as f:
                out[peer] = orjson.loads(f.read())["version"]
            out[peer] += " (node " + run_cmd(["node", "--version"], 20).stdout.strip() + ")"
        else:
            out[peer] = run_cmd([path, "--version"], 20).stdout.splitlines()[0].split()[-1]
    return out


@dataclass
class Spec:
    """What to run: ``n`` copies of ``argv``, and how the manager should treat exits."""

    n: int
    argv: list[str]
    respawn: bool | None = None  # None: the manager's defaults; True: restart at once
    orch_args: list[str] = field(default_factory=list)
    detach: bool = False  # orch only: `orch run -d`, the master is the daemon
    logs: str | None = None  # supervisor: one stdout file per child in this directory


@dataclass
class Fleet:
    name: str
    proc: subprocess.Popen[bytes]
    workdir: str
    t0: float
    pidfile: str | None = None  # where the manager's pid appears (detached managers)
    ctl: list[str] = field(default_factory=list)  # a status command, when there is one
    env: dict[str, str] | None = None
    run_id: str | None = None
    home: str | None = None
    _manager: int | None = None

    def manager(self) -> int | None:
        """The pid of the supervising process (not the CLI that started it)."""
        if self._manager is not None:
            return self._manager
        if self.pidfile is None:
            self._manager = self.proc.pid
        else:
            try:
                with open(self.pidfile) as f:
                    self._manager = int(f.read().strip())
            except (OSError, ValueError):
                return None
        return self._manager

    def count(self, comm: str = "sleep", need: int = 0) -> int:
        pid = self.manager()
        if pid is None:
            return 0
        if need and len(children(pid)) < need:
            return 0  # cheap first look: not enough children yet
        return len(running(pid, comm))

    def wait_running(self, n: int, timeout_s: float, comm: str = "sleep") -> float | None:
        """Seconds from launch until ``n`` children named ``comm`` run; None on timeout."""
        deadline = self.t0 + timeout_s
        while time.perf_counter() < deadline:
            if self.count(comm, n) >= n:
                return time.perf_counter() - self.t0
            if self.proc.poll() is not None and self.pidfile is None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            time.sleep(0.002)
        return None

    def close(self) -> None:
        pid = self.manager()
        if pid is not None and pid != self.proc.pid:
            kill_tree(pid)
        stop(self.proc)


def start(name: str, spec: Spec, workdir: str) -> Fleet:
    starter = {"orch": _orch, "supervisor": _supervisor, "circus": _circus, "pm2": _pm2,
               "parallel": _parallel, "spawn-loop": _spawn_loop,
               "spawn-loop-pipes": _spawn_loop_pipes}[name]
    return starter(spec, workdir)


# --- orch ----------------------------------------------------------------------------


def _orch(spec: Spec, workdir: str) -> Fleet:
    home = os.path.join(workdir, "h")
    argv = [*ORCH, "run", "--home", home, "--split", str(spec.n), *spec.orch_args]
    if spec.respawn:
        argv += ["--restart", "always", "--backoff-initial", "0", "--max-restarts", "100000"]
    elif spec.respawn is False:
        argv += ["--restart", "never"]
    if spec.detach:
        argv.append("-d")
    argv += ["--", *spec.argv]
    with open(os.path.join(workdir, "orch.out"), "wb") as out:
        t0 = time.perf_counter()
        proc = launch(argv, env=base_env(), cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    fleet = Fleet("orch", proc, workdir, t0, home=home)
    if spec.detach:
        if proc.wait(60) != 0:
            raise RuntimeError(_tail(os.path.join(workdir, "orch.out")))
        with open(os.path.join(workdir, "orch.out")) as f:
            fleet.run_id = f.read().split()[-1]
        fleet.pidfile = os.path.join(home, "runs", fleet.run_id, "master.pid")
    else:
        fleet.run_id = _orch_run_id(home, proc)
    return fleet


def _orch_run_id(home: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> str | None:
    runs = os.path.join(home, "runs")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            names = os.listdir(runs)
            if names:
                return sorted(names)[-1]
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip().splitlines()[-1][:200]
    except (OSError, IndexError):
        return "no output"


def orch_status_json(fleet: Fleet) -> dict:
    out = run_cmd([*ORCH, "status", fleet.run_id or "", "--home", fleet.home or "", "--json"], 60)
    return orjson.loads(out.stdout)


# --- supervisor ---------------------------------------------------------------------------


def _supervisor(spec: Spec, workdir: str) -> Fleet:
    binary = require("supervisor")
    sock = os.path.join(workdir, "sup.sock")
    lines = [
        "[unix_http_server]", f"file={sock}",
        "[supervisord]", f"logfile={workdir}/supervisord.log", f"pidfile={workdir}/sup.pid",
        "nodaemon=true", f"childlogdir={workdir}", "minfds=20000", "minprocs=1000",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]", f"serverurl=unix://{sock}",
        "[program:w]", "command=" + " ".join(_quote(a) for a in spec.argv),
        f"numprocs={spec.n}", "process_name=%(program_name)s_%(process_num)04d",
    ]
    if spec.respawn:
        lines += ["autorestart=true", "startsecs=0"]
    elif spec.respawn is False:
        lines += ["autorestart=false", "startsecs=0"]
    if spec.logs:
        lines += [f"stdout_logfile={spec.logs}/w_%(process_num)04d.log",
                  "stdout_logfile_maxbytes=0", "stderr_logfile=NONE"]
    conf = os.path.join(workdir, "supervisord.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    proc = launch([binary, "-c", conf], cwd=workdir, env=base_env())
    ctl = [os.path.join(os.path.dirname(binary), "supervisorctl"), "-c", conf, "status"]
    return Fleet("supervisor", proc, workdir, t0, ctl=ctl)


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-=" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- circus -------------------------------------------------------------------------------


def _circus(spec: Spec, workdir: str) -> Fleet:
    binary = require("circus")
    ep = f"ipc://{workdir}/circus"
    args = " ".join(_quote(a) for a in spec.argv[1:])
    lines = [
        "[circus]", f"endpoint = {ep}-ctl.sock", f"pubsub_endpoint = {ep}-pub.sock",
        f"stats_endpoint = {ep}-stats.sock", "statsd = False",
        "[watcher:w]", f"cmd = {spec.argv[0]}", f"args = {args}",
        f"numprocesses = {spec.n}", "copy_env = True",
    ]
    if spec.respawn is False:
        lines.append("respawn = False")
    conf = os.path.join(workdir, "circus.ini")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    proc = launch([binary, conf], cwd=workdir, env=base_env())
    ctl = [os.path.join(os.path.dirname(binary), "circusctl"), "--endpoint", f"{ep}-ctl.sock",
           "status"]
    return Fleet("circus", proc, workdir, t0, ctl=ctl)


# --- pm2 ----------------------------------------------------------------------------------


def _pm2(spec: Spec, workdir: str) -> Fleet:
    binary = require("pm2")
    home = os.path.join(workdir, "pm2")
    app = {"name": "w", "script": spec.argv[0], "args": spec.argv[1:], "instances": spec.n,
           "exec_mode": "fork", "interpreter": "none", "merge_logs": True}
    if spec.respawn:
        app.update({"autorestart": True, "restart_delay": 0})
    elif spec.respawn is False:
        app["autorestart"] = False
    eco = os.path.join(workdir, "ecosystem.json")
    with open(eco, "wb") as f:
        f.write(orjson.dumps({"apps": [app]}))
    env = base_env(PM2_HOME=home, PM2_DISABLE_VERSION_CHECK="true")
    t0 = time.perf_counter()
    proc = launch([binary, "start", eco], cwd=workdir, env=env)
    return Fleet("pm2", proc, workdir, t0, pidfile=os.path.join(home, "pm2.pid"),
                 ctl=[binary, "jlist"], env=env)


# --- GNU parallel ------------------------------------------------------------------------


def _parallel(spec: Spec, workdir: str) -> Fleet:
    if spec.respawn:
        raise Skip("n/a (no restart)")
    binary = require("parallel")
    argv = [binary, "--will-cite", "-j", str(spec.n), "-N0", *spec.argv, ":::",
            *map(str, range(spec.n))]
    env = base_env(TMPDIR=workdir, PARALLEL_HOME=os.path.join(workdir, "par"))
    t0 = time.perf_counter()
    proc = launch(argv, cwd=workdir, env=env)
    return Fleet("parallel", proc, workdir, t0)


# --- the limit: a bare Python spawn loop ---------------------------------------------------------

_SPAWN_LOOP = """
import os, sys, time
argv = sys.argv[2:]
for _ in range(int(sys.argv[1])):
    os.posix_spawn(argv[0], argv, os.environ)
time.sleep(3600)
"""


#: The same loop, but each child gets a stdout and a stderr pipe whose read ends the
#: parent keeps open, as orch keeps them to read the output: every spawn then copies
#: (and its exec closes) a descriptor table that grows by two per child.
_SPAWN_LOOP_PIPES = """
import os, sys, time
argv = sys.argv[2:]
kept = []
for _ in range(int(sys.argv[1])):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.posix_spawn(argv[0], argv, os.environ, file_actions=[
        (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)])
    os.close(out_w)
    os.close(err_w)
    kept += (out_r, err_r)
time.sleep(3600)
"""


def _spawn_loop(spec: Spec, workdir: str, script: str = _SPAWN_LOOP,
                name: str = "spawn-loop") -> Fleet:
    t0 = time.perf_counter()
    proc = launch([PY, "-c", script, str(spec.n), *spec.argv], cwd=workdir, env=base_env())
    return Fleet(name, proc, workdir, t0)


def _spawn_loop_pipes(spec: Spec, workdir: str) -> Fleet:
    return _spawn_loop(spec, workdir, _SPAWN_LOOP_PIPES, "spawn-loop-pipes")
