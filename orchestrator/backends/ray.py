"""The Ray backend: attempts run on the nodes of an existing Ray cluster.

orch stays the brain (shard states, restarts, backoff, heartbeats, progress,
checkpoints, the store); Ray places each attempt and runs its process on a
node; ZeroMQ (CURVE over TCP) stays the data plane for heartbeats.

- One detached named actor per attempt (``ray_actor.AttemptActor``, named
  ``orch-<run>-<index>-<attempt>`` in namespace ``orch``) starts the shard's
  command in its own process group on its node and reports back.
- Output and exits come back by long polls: a daemon thread runs an asyncio
  loop that keeps one ``poll`` call outstanding per live actor and hands
  every answer to the master through a queue and a wake-up pipe registered
  in the master's loop. So the master loop stays single-threaded and learns
  of everything through an fd, like child exits of the local backend; the
  thread never touches shard state. Why polls rather than the actor pushing
  over its own socket: the actor needs no way back to the master besides
  Ray's, a poll is also the master's liveness signal to the actor (its
  guardian), and an actor that dies fails its outstanding poll, which is how
  a lost node is noticed.
- A poll that fails with the actor dead: if the actor's node is no longer
  alive in the cluster, the attempt is ``Lost`` (``node lost: <node>``) and
  re-placed without counting against ``max_restarts``; otherwise the actor
  died on a live node and the attempt ended with SIGKILL (its leader has a
  parent-death signal).
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from orchestrator.backends import AttemptHandle, AttemptSpec, Backend, Listener, Stream
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
#: How long the reachability check waits for the cluster's address to answer.
CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "--backend ray needs Ray: pip install 'orch[ray]'"
#: Environment overrides for the heartbeat channel's TCP address (docs/scale-out.md).
ENV_CHANNEL_HOST = "ORCH_CHANNEL_HOST"
ENV_CHANNEL_BIND = "ORCH_CHANNEL_BIND"


def actor_name(run_id: str, index: int, attempt: int) -> str:
    """The name a (resumed) master finds an attempt's actor by."""
    return f"orch-{run_id}-{index}-{attempt}"


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


@dataclass(slots=True)
class _Remote:
    handle: AttemptHandle
    actor: Any
    node: str | None = None
    ended: bool = False


class _Pump:
    """A daemon thread with an asyncio loop: one outstanding poll per live actor."""

    def __init__(self, deliver: Any) -> None:
        self._deliver = deliver
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orch-ray", daemon=True)
        self._thread.start()

    def submit(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2.0)


class RayBackend(Backend):
    """Start, signal and observe attempts as Ray actors (see the module docstring)."""

    #: The actors stop their groups when the master is gone: no local guardian.
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
        from orchestrator.backends.ray_actor import AttemptActor

        self._actor_class = ray.remote(AttemptActor)
        self._loop = loop
        self.cluster = cluster
        self.run_id = run_id
        # With the heartbeat timeout off, the actors still stop their groups when the
        # master's polls stop: after MASTER_GONE_S.
        self._master_timeout_s = heartbeat_timeout_s or MASTER_GONE_S
        self._stop_timeout_s = stop_timeout_s
        self._options: dict[str, Any] = {
            "lifetime": "detached",
            "namespace": NAMESPACE,
            "num_cpus": num_cpus,
            "max_restarts": 0,
            "max_concurrency": 8,
            "scheduling_strategy": "SPREAD",
        }
        if memory_bytes:
            self._options["memory"] = memory_bytes
        if resources:
            self._options["resources"] = dict(resources)
        self.channel_port = channel_port
        self._env_extra: dict[str, str] = {}
        self._close_zap: Any = None
        self._remotes: dict[tuple[int, int], _Remote] = {}
        self._inbox: collections.deque[tuple[str, tuple[int, int], Any]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        loop.add_reader(self._wake_r, self._drain)
        self._pump = _Pump(self._post)

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

    # --- starting ---------------------------------------------------------------

    def start(self, spec: AttemptSpec) -> AttemptHandle:
        env = dict(spec.env)
        # The master's pid means nothing on another machine: the actor watches the master.
        env.pop(proto.ENV_MASTER_PID, None)
        # The cluster's token is the master's credential, not the shard's.
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(self._env_extra)
        name = actor_name(self.run_id, spec.index, spec.attempt)
        actor = self._actor_class.options(name=name, **self._options).remote(
            list(spec.argv), env, spec.cwd, self._master_timeout_s, self._stop_timeout_s
        )
        handle = AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)
        self._follow(handle, actor, start=True)
        return handle

    def reattach(self, spec: AttemptSpec) -> AttemptHandle | None:
        """The handle of a live actor left by a previous master for this attempt, or None."""
        try:
            actor = self._ray.get_actor(
                actor_name(self.run_id, spec.index, spec.attempt), namespace=NAMESPACE
            )
        except ValueError:
            return None
        handle = AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)
        self._follow(handle, actor, start=False)
        return handle

    def _follow(self, handle: AttemptHandle, actor: Any, start: bool) -> None:
        key = (handle.spec.index, handle.spec.attempt)
        self._remotes[key] = _Remote(handle=handle, actor=actor)
        self._pump.submit(self._poll_loop(key, actor, start))

    async def _poll_loop(self, key: tuple[int, int], actor: Any, start: bool) -> None:
        """Runs in the pump thread: start the process, then poll until the exit or death."""
        ray = self._ray
        node: str | None = None
        try:
            if start:
                info = await actor.start.remote()
                node = info["node"]
                self._post("placed", key, node)
            while True:
                try:
                    answer = await actor.poll.remote(POLL_WAIT_S)
                except ray.exceptions.ActorUnavailableError:
                    await asyncio.sleep(0.2)  # unreachable for now; dead comes next
                    continue
                if node is None:
                    node = answer["node"]
                    self._post("placed", key, node)
                self._post("poll", key, answer)
                if answer["code"] is not None:
                    return
        except ray.exceptions.RayActorError as exc:
            node = node or getattr(exc, "_node_id", None)
            alive = await asyncio.get_running_loop().run_in_executor(None, self._node_alive, node)
            self._post("gone", key, (node, alive))
        except Exception as exc:  # noqa: BLE001 - any Ray failure ends the attempt, visibly
            self._post("gone", key, (node, None, repr(exc)))

    def _node_alive(self, node: str | None) -> bool | None:
        if node is None:
            return None
        for info in self._ray.nodes():
            if info.get("NodeID") == node:
                return bool(info.get("Alive"))
        return False

    def _post(self, kind: str, key: tuple[int, int], value: Any) -> None:
        """From the pump thread: queue an event for the master loop and wake it."""
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
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        inbox = self._inbox
        while inbox:
            kind, key, value = inbox.popleft()
            remote = self._remotes.get(key)
            if remote is None or remote.ended:
                continue
            handle = remote.handle
            if kind == "placed":
                remote.node = value
                listener.on_node(handle, value)
            elif kind == "poll":
                if value["out"]:
                    listener.on_output(handle, Stream.STDOUT, value["out"])
                if value["err"]:
                    listener.on_output(handle, Stream.STDERR, value["err"])
                if value["code"] is not None:
                    self._end(remote)
                    listener.on_exit(handle, value["code"])
            elif kind == "gone":
                node, alive = value[0], value[1]
                self._end(remote, kill=False)
                if alive is False:
                    listener.on_lost(handle, f"node lost: {node}")
                else:
                    listener.on_exit(handle, -signal.SIGKILL)

    def _end(self, remote: _Remote, kill: bool = True) -> None:
        remote.ended = True
        del self._remotes[(remote.handle.spec.index, remote.handle.spec.attempt)]
        if kill:
            # Its group is gone; the actor's process holds a worker slot until killed.
            self._kill(remote.actor)

    def _kill(self, actor: Any) -> None:
        """Ask Ray to end the actor's process (asynchronous inside Ray: cheap here)."""
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    # --- signals ------------------------------------------------------------------

    def signal(self, handle: AttemptHandle, signum: int) -> None:
        remote = self._remotes.get((handle.spec.index, handle.spec.attempt))
        if remote is None:
            return
        self._pump.submit(self._signal(remote.actor, signum))

    async def _signal(self, actor: Any, signum: int) -> None:
        try:
            await actor.signal.remote(signum)
        except Exception:  # noqa: BLE001 - a dead actor's group is gone too
            pass

    def live(self) -> list[AttemptHandle]:
        return [r.handle for r in self._remotes.values()]

    def reap(self) -> None:
        """No local children: exits arrive by the actors' polls (``_drain``)."""

    def stamp(self) -> list[AttemptHandle]:
        """Attempts run elsewhere: no local start time to record."""
        return []

    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        """Memory of remote attempts is not measured here (Ray's own limits apply)."""
        return [None] * len(handles)

    def kill_all(self) -> None:
        for remote in self._remotes.values():
            self.signal(remote.handle, signal.SIGKILL)

    def node_of(self, handle: AttemptHandle) -> str | None:
        remote = self._remotes.get((handle.spec.index, handle.spec.attempt))
        return remote.node if remote is not None else None

    def close(self) -> None:
        for remote in list(self._remotes.values()):
            self._end(remote)
        self._pump.close()
        if self._close_zap is not None:
            self._close_zap()
        self._loop.remove_reader(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ray.shutdown()
