"""The Ray backend: attempts run on the nodes of an existing Ray cluster.

orch stays the brain (shard states, restarts, backoff, heartbeats, progress,
checkpoints, the store); Ray places each attempt and runs its process on a
node; ZeroMQ (CURVE over TCP) stays the data plane for heartbeats.

- orch places each attempt on a node itself (``placement.choose``: this
  run's ``--shard-cpus``, ``--shard-memory`` and ``resources`` counted
  against each alive node's totals, spread by free share). An attempt that
  fits no node now waits in the backend's queue; one that fits no node ever
  is refused before the run exists (``check_fits``).
- One detached named host actor per node per run (``ray_actor.HostActor``,
  ``orch-<run>-host-<node>`` in namespace ``orch``, ``num_cpus=0``, pinned to
  its node) is started on the node's first attempt and runs all of the run's
  attempts there as subprocesses, each in its own process group.
- Output and exits come back by long polls: a daemon thread runs an asyncio
  loop that keeps one ``poll`` call outstanding per host actor and hands
  every answer to the master through a queue and a wake-up pipe registered
  in the master's loop. So the master loop stays single-threaded and learns
  of everything through an fd, like child exits of the local backend; the
  thread never touches shard state. Why polls rather than the actor pushing
  over its own socket: the actor needs no way back to the master besides
  Ray's, a poll is also the master's liveness signal to the actor (its
  guardian), and an actor that dies fails its outstanding poll, which is how
  a lost node is noticed.
- A poll that fails with the host actor dead: if its node is no longer
  alive in the cluster, every attempt on it is ``Lost`` (``node lost:
  <node>``) and re-placed, on another node's existing host actor, without
  counting against ``max_restarts``; otherwise the host actor died on a
  live node and its attempts ended with SIGKILL (their leaders have a
  parent-death signal); the node's next attempt starts a new host actor.
- ``import ray`` happens only here, only for ``--backend ray``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from orchestrator.backends import AttemptHandle, AttemptSpec, Backend, Listener, Stream
from orchestrator.backends.placement import Node, Use, choose, demand_of, describe, ever_fits
from orchestrator.errors import ConfigError
from orchestrator.loop import Loop
from shards import protocol as proto

if TYPE_CHECKING:
    from orchestrator.backends import BoundSocket

NAMESPACE = "orch"
#: How long one poll waits in the actor for output or an exit.
POLL_WAIT_S = 1.0
#: How long an actor waits without a poll before it stops its group, when the run's
#: heartbeat timeout is off (``heartbeat_timeout = 0``); else the heartbeat timeout.
MASTER_GONE_S = 10.0
#: How old the cached list of alive nodes may get before placement asks Ray again.
NODES_TTL_S = 2.0
#: How long a resumed master waits for a host actor to say which attempts it runs.
ALIVE_TIMEOUT_S = 20.0
STOPS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)
#: How long the reachability check waits for the cluster's address to answer.
CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "--backend ray needs Ray: pip install 'orch[ray]'"
#: Environment overrides for the heartbeat channel's TCP address (docs/scale-out.md).
ENV_CHANNEL_HOST = "ORCH_CHANNEL_HOST"
ENV_CHANNEL_BIND = "ORCH_CHANNEL_BIND"


#: Characters of the node id in a host actor's name.
NODE_PREFIX = 16
Key = tuple[int, int]


def host_name(run_id: str, node: str) -> str:
    """The name a (resumed) master finds a run's host actor on ``node`` by."""
    return f"orch-{run_id}-host-{node[:NODE_PREFIX]}"


def join(cluster: Cluster) -> Any:
    """Connect this process to the cluster as a driver (once); ConfigError in one line.

    Called by the preflight, before the run exists, so a cluster that refuses
    us (token authentication without the token) leaves nothing behind; the
    master reuses the connection.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    # Ray's C++ core prints its retries straight to fd 2: keep them, say one line.
    saved = os.dup(2)
    with tempfile.TemporaryFile() as noise:
        os.dup2(noise.fileno(), 2)
        try:
            ray.init(
                address=cluster.address,
                namespace=NAMESPACE,
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            noise.seek(0)
            said = noise.read().decode(errors="replace")
            text = str(exc).strip()
            why = text.splitlines()[0] if text else type(exc).__name__
            if "InvalidAuthToken" in said:
                why = (
                    "it requires token authentication: give orch the cluster's token "
                    "(RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
                )
            raise ConfigError(f"cannot join the Ray cluster at {cluster.address}: {why}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return ray


def require_ray() -> Any:
    """``import ray``, or ConfigError with the install line."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True, slots=True)
class Cluster:
    """Where the cluster is, and the address of this machine as the cluster's nodes see it."""

    address: str
    host: str
    port: int
    local_ip: str


def check_cluster(address: str | None) -> Cluster:
    """Is Ray installed and its cluster reachable? Checked before the run exists.

    ``address`` None or ``auto`` is Ray's own discovery (``RAY_ADDRESS``, then
    the cluster started on this machine). Raises ConfigError in one line naming
    the address, within ``CONNECT_TIMEOUT_S``.
    """
    require_ray()
    given = address or "auto"
    resolved: str | None = given
    if given == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError, OSError):
            resolved = None
        if not resolved:
            raise ConfigError(
                "no Ray cluster found (--ray-address auto): start one with 'ray start --head' "
                "or give --ray-address HOST:PORT"
            )
    assert resolved is not None
    host, sep, port_text = resolved.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ConfigError(f"--ray-address {given!r}: expected HOST:PORT")
    host = host.strip("[]")
    port = int(port_text)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as conn:
            local_ip = conn.getsockname()[0]
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(f"Ray cluster at {resolved} is unreachable: {why}") from None
    return Cluster(address=f"{host}:{port}", host=host, port=port, local_ip=local_ip)


def alive_nodes(ray: Any) -> list[Node]:
    """The cluster's alive nodes and their resource totals."""
    return [
        Node(id=str(n["NodeID"]), total=dict(n.get("Resources") or {}))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_fits(
    num_cpus: float, memory_bytes: int | None, resources: dict[str, float] | None
) -> None:
    """Before the run exists (joined already): ConfigError when no alive node could
    ever run one attempt, whatever this run does."""
    ray = require_ray()
    demand = demand_of(num_cpus, memory_bytes, resources)
    nodes = alive_nodes(ray)
    if not ever_fits(nodes, demand):
        biggest = "; ".join(
            f"{n.id[:12]}: {describe({k: v for k, v in n.total.items() if k in demand})}"
            for n in nodes
        )
        raise ConfigError(
            f"no node of the Ray cluster can run a shard needing {describe(demand)} "
            f"(alive nodes have: {biggest or 'none'})"
        )


@dataclass(slots=True)
class _Remote:
    handle: AttemptHandle
    env: dict[str, str]
    node: str | None = None  # where it was placed; None while it waits for room
    ended: bool = False


@dataclass(slots=True)
class _Host:
    node: str
    actor: Any
    keys: set[Key] = field(default_factory=set)
    gone: bool = False


class _Pump:
    """A daemon thread with an asyncio loop: one outstanding poll per host actor."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orch-ray", daemon=True)
        self._thread.start()

    def submit(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2.0)


class RayBackend(Backend):
    """Place attempts on nodes and run them by the nodes' host actors (module docstring)."""

    #: The host actors stop their groups when the master is gone: no local guardian.
    guards_itself = True

    def __init__(
        self,
        loop: Loop,
        *,
        cluster: Cluster,
        run_id: str,
        heartbeat_timeout_s: float | None,
        stop_timeout_s: float,
        num_cpus: float = 1.0,
        memory_bytes: int | None = None,
        resources: dict[str, float] | None = None,
        channel_port: int = 0,
    ) -> None:
        ray = join(cluster)
        self._ray = ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from orchestrator.backends.ray_actor import HostActor

        self._affinity = NodeAffinitySchedulingStrategy
        self._actor_class = ray.remote(HostActor)
        self._loop = loop
        self.cluster = cluster
        self.run_id = run_id
        # With the heartbeat timeout off, the host actors still stop their groups when
        # the master's polls stop: after MASTER_GONE_S.
        self._master_timeout_s = heartbeat_timeout_s or MASTER_GONE_S
        self._stop_timeout_s = stop_timeout_s
        self._options: dict[str, Any] = {
            "lifetime": "detached",
            "namespace": NAMESPACE,
            "num_cpus": 0,
            "max_restarts": 0,
            "max_concurrency": 1000,
            "get_if_exists": True,
        }
        self.demand = demand_of(num_cpus, memory_bytes, resources)
        self.channel_port = channel_port
        self._env_extra: dict[str, str] = {}
        self._close_zap: Any = None
        self._remotes: dict[Key, _Remote] = {}
        self._waiting: collections.deque[_Remote] = collections.deque()
        self._hosts: dict[str, _Host] = {}
        self._use: dict[str, Use] = {}
        self._nodes: list[Node] = []
        self._nodes_at = -NODES_TTL_S
        self._found: dict[Key, str] | None = None  # resume: attempts the host actors run
        self._inbox: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        loop.add_reader(self._wake_r, self._drain)
        self._closed = False
        self._pump = _Pump()

    # --- the channel ----------------------------------------------------------

    def bind_channel(self, loop: Loop, run_dir: str) -> BoundSocket | None:
        """The heartbeat channel over TCP with CURVE (``orchestrator.curve``)."""
        from orchestrator import curve
        from orchestrator.channel import SOCKET_OPTIONS

        keys = curve.load_or_create_keys(run_dir)
        advertise = os.environ.get(ENV_CHANNEL_HOST) or self.cluster.local_ip
        default_bind = advertise if advertise.startswith("127.") else "0.0.0.0"
        bind = os.environ.get(ENV_CHANNEL_BIND) or default_bind
        try:
            sock, endpoint, self._close_zap = curve.bind_curve(
                loop, keys, bind, self.channel_port, advertise, SOCKET_OPTIONS
            )
        except zmq.ZMQError:
            if not self.channel_port:
                raise
            # The resumed run's old port is taken: attempts still alive cannot send their
            # heartbeats here, so they are found hung and replaced; new attempts get this one.
            sock, endpoint, self._close_zap = curve.bind_curve(
                loop, keys, bind, 0, advertise, SOCKET_OPTIONS
            )
        self._env_extra = keys.client_env()
        return sock, endpoint

    # --- placement ----------------------------------------------------------------

    def _alive(self) -> list[Node]:
        now = time.monotonic()
        if now - self._nodes_at >= NODES_TTL_S:
            self._nodes = alive_nodes(self._ray)
            self._nodes_at = now
        return self._nodes

    def _host(self, node: str) -> _Host:
        """The run's host actor on ``node``: started on first use, then polled for good."""
        host = self._hosts.get(node)
        if host is None:
            actor = self._actor_class.options(
                name=host_name(self.run_id, node),
                scheduling_strategy=self._affinity(node_id=node, soft=False),
                **self._options,
            ).remote(self._master_timeout_s, self._stop_timeout_s)
            host = self._hosts[node] = _Host(node=node, actor=actor)
            self._pump.submit(self._poll_loop(host))
        return host

    def _place(self, remote: _Remote) -> bool:
        node = choose(self._alive(), self._use, self.demand)
        if node is None:
            return False
        spec = remote.handle.spec
        key = (spec.index, spec.attempt)
        host = self._host(node)
        self._use.setdefault(node, Use()).add(self.demand)
        host.keys.add(key)
        remote.node = node
        self._pump.submit(self._start(host, key, list(spec.argv), remote.env, spec.cwd))
        return True

    def _dispatch(self) -> None:
        """Place waiting attempts, oldest first, while they fit."""
        while self._waiting:
            remote = self._waiting[0]
            if remote.ended:
                self._waiting.popleft()
                continue
            if not self._place(remote):
                return
            self._waiting.popleft()

    # --- starting -------------------------------------------------------------------

    def start(self, spec: AttemptSpec) -> AttemptHandle:
        self._settle_found()
        env = dict(spec.env)
        # The master's pid means nothing on another machine: the host actor watches it.
        env.pop(proto.ENV_MASTER_PID, None)
        # The cluster's token is the master's credential, not the shard's.
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(self._env_extra)
        handle = AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)
        remote = _Remote(handle=handle, env=env)
        key = (spec.index, spec.attempt)
        self._remotes[key] = remote
        if self._waiting or not self._place(remote):
            self._waiting.append(remote)
            self._dispatch()
        if remote.node is None:
            nodes = len(self._alive())
            why = (
                f"waiting for a node with {describe(self.demand)} free "
                f"({nodes} alive node{'s' if nodes != 1 else ''}, all taken by this run)"
            )
            self._post("out", key, f"orch: {why}\n".encode())
            self._post("waiting", key, why)
        return handle

    async def _start(
        self, host: _Host, key: Key, argv: list[str], env: dict[str, str], cwd: str | None
    ) -> None:
        """In the pump thread: ask the node's host actor to start the attempt."""
        ray = self._ray
        try:
            info = await host.actor.start.remote(key[0], key[1], argv, env, cwd)
        except ray.exceptions.RayActorError:
            return  # the host actor is gone: its poll loop reports every attempt on it
        except Exception as exc:  # noqa: BLE001 - a failed start ends the attempt, visibly
            text = str(exc).strip().splitlines()
            self._post("failed", key, text[-1] if text else type(exc).__name__)
            return
        self._post("placed", key, info["node"])

    def reattach(self, spec: AttemptSpec) -> AttemptHandle | None:
        """The handle of an attempt a previous master left running on a host actor, or None."""
        if self._found is None:
            self._found = self._discover()
        key = (spec.index, spec.attempt)
        node = self._found.pop(key, None)
        if node is None:
            return None
        handle = AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)
        self._remotes[key] = _Remote(handle=handle, env={}, node=node)
        self._use.setdefault(node, Use()).add(self.demand)
        self._hosts[node].keys.add(key)
        self._post("placed", key, node)
        return handle

    def _discover(self) -> dict[Key, str]:
        """Resume: the run's host actors still alive, polled from now on, and the attempts
        each runs (or ended without the exit being taken)."""
        found: dict[Key, str] = {}
        for node in self._alive():
            try:
                actor = self._ray.get_actor(host_name(self.run_id, node.id), namespace=NAMESPACE)
            except ValueError:
                continue
            try:
                keys = self._ray.get(actor.alive.remote(), timeout=ALIVE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a host actor that cannot answer is gone
                continue
            host = self._hosts[node.id] = _Host(node=node.id, actor=actor)
            self._pump.submit(self._poll_loop(host))
            for index, attempt in keys:
                found[(int(index), int(attempt))] = node.id
        return found

    def _settle_found(self) -> None:
        """After the resume's reattach pass: stop what a host actor runs that no shard took
        back (an attempt superseded meanwhile), so no shard has two live attempts."""
        if not self._found:
            return
        for (index, attempt), node in self._found.items():
            host = self._hosts.get(node)
            if host is not None:
                self._pump.submit(self._signal(host, (index, attempt), signal.SIGKILL))
        self._found.clear()

    # --- polling (in the pump thread) -------------------------------------------------

    async def _poll_loop(self, host: _Host) -> None:
        """Poll the host actor until it is gone or the backend closes."""
        ray = self._ray
        acked: list[list[int]] = []
        while not self._closed:
            try:
                answer = await host.actor.poll.remote(POLL_WAIT_S, acked)
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(0.2)  # unreachable for now; dead comes next
                continue
            except ray.exceptions.RayActorError:
                loop = asyncio.get_running_loop()
                alive = await loop.run_in_executor(None, self._node_alive, host.node)
                self._post("host_gone", host, alive)
                return
            except Exception:  # noqa: BLE001 - any Ray failure ends its attempts
                if not self._closed:
                    self._post("host_gone", host, None)
                return
            report = answer["attempts"]
            acked = [[r[0], r[1]] for r in report if r[4] is not None]
            if report or self._waiting:
                # Attempts waiting for room: every answer is a chance to place them (an
                # exit frees room; the node list, refreshed every NODES_TTL_S, may grow).
                self._post("poll", host, report)

    def _node_alive(self, node: str) -> bool | None:
        try:
            for info in self._ray.nodes():
                if info.get("NodeID") == node:
                    return bool(info.get("Alive"))
        except Exception:  # noqa: BLE001 - cannot tell
            return None
        return False

    def _post(self, kind: str, key: Any, value: Any) -> None:
        """Queue an event for the master loop and wake it (from any thread)."""
        self._inbox.append((kind, key, value))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake anyway

    # --- in the master loop -------------------------------------------------------

    def _listener(self) -> Listener:
        if self.listener is None:
            raise RuntimeError("the ray backend reports before it was bound to a master")
        return self.listener

    def _drain(self) -> None:
        listener = self._listener()
        self._settle_found()  # the resume's reattach pass ran before the loop did
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        inbox = self._inbox
        while inbox:
            kind, key, value = inbox.popleft()
            if kind == "poll":
                for index, attempt, out, err, code in value:
                    remote = self._remotes.get((index, attempt))
                    if remote is None or remote.ended:
                        continue
                    if out:
                        listener.on_output(remote.handle, Stream.STDOUT, out)
                    if err:
                        listener.on_output(remote.handle, Stream.STDERR, err)
                    if code is not None:
                        self._end(remote)
                        listener.on_exit(remote.handle, code)
            elif kind == "host_gone":
                self._host_gone(listener, key, value)
            else:
                remote = self._remotes.get(key)
                if remote is None or remote.ended:
                    continue
                if kind == "placed":
                    listener.on_node(remote.handle, value)
                elif kind == "waiting":
                    listener.on_waiting(remote.handle, value)
                elif kind == "out":
                    listener.on_output(remote.handle, Stream.STDERR, value)
                elif kind == "failed":
                    listener.on_output(
                        remote.handle, Stream.STDERR, f"orch: cannot start: {value}\n".encode()
                    )
                    self._end(remote)
                    listener.on_exit(remote.handle, 127)
                elif kind == "exit":
                    self._end(remote)
                    listener.on_exit(remote.handle, value)
        self._dispatch()

    def _host_gone(self, listener: Listener, host: _Host, alive: bool | None) -> None:
        """A host actor died: with its node (every attempt Lost), or alone (SIGKILL)."""
        host.gone = True
        if self._hosts.get(host.node) is host:
            del self._hosts[host.node]
        if alive is False:
            self._nodes = [n for n in self._nodes if n.id != host.node]
        for key in sorted(host.keys):
            remote = self._remotes.get(key)
            if remote is None or remote.ended:
                continue
            self._end(remote)
            if alive is False:
                listener.on_lost(remote.handle, f"node lost: {host.node}")
            else:
                listener.on_exit(remote.handle, -signal.SIGKILL)

    def _end(self, remote: _Remote) -> None:
        """The attempt is over: free its share of its node."""
        remote.ended = True
        spec = remote.handle.spec
        key = (spec.index, spec.attempt)
        self._remotes.pop(key, None)
        if remote.node is not None:
            use = self._use.get(remote.node)
            if use is not None:
                use.remove(self.demand)
            host = self._hosts.get(remote.node)
            if host is not None:
                host.keys.discard(key)

    # --- signals ------------------------------------------------------------------

    def signal(self, handle: AttemptHandle, signum: int) -> None:
        key = (handle.spec.index, handle.spec.attempt)
        remote = self._remotes.get(key)
        if remote is None or remote.ended:
            return
        if remote.node is None:  # still waiting for room: it never ran
            if signum in STOPS:
                self._waiting = collections.deque(r for r in self._waiting if r is not remote)
                self._post("exit", key, -signum)
            return
        host = self._hosts.get(remote.node)
        if host is not None:
            self._pump.submit(self._signal(host, key, signum))

    async def _signal(self, host: _Host, key: Key, signum: int) -> None:
        try:
            await host.actor.signal.remote(key[0], key[1], signum)
        except Exception:  # noqa: BLE001 - a dead host actor's groups are gone too
            pass

    def live(self) -> list[AttemptHandle]:
        return [r.handle for r in self._remotes.values()]

    def reap(self) -> None:
        """No local children: exits arrive by the host actors' polls (``_drain``)."""

    def stamp(self) -> list[AttemptHandle]:
        """Attempts run elsewhere: no local start time to record."""
        return []

    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        """Memory of remote attempts is not measured here (Ray's own limits apply)."""
        return [None] * len(handles)

    def kill_all(self) -> None:
        for remote in list(self._remotes.values()):
            self.signal(remote.handle, signal.SIGKILL)

    def node_of(self, handle: AttemptHandle) -> str | None:
        remote = self._remotes.get((handle.spec.index, handle.spec.attempt))
        return remote.node if remote is not None else None

    def hosts(self) -> dict[str, Any]:
        """The run's live host actors by node (bench/m_ray.py asks them for their RSS)."""
        return {node: host.actor for node, host in self._hosts.items()}

    def close(self) -> None:
        self._closed = True
        for host in list(self._hosts.values()):
            # Every attempt is stopped by now: end the worker process that hosted them.
            try:
                self._ray.kill(host.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        self._hosts.clear()
        self._pump.close()
        if self._close_zap is not None:
            self._close_zap()
        self._loop.remove_reader(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ray.shutdown()
