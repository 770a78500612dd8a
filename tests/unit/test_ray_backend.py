"""The Ray backend's bookkeeping, with a fake ``ray`` module (no cluster, no processes).

What is checked: attempts go to the run's one host actor per node (created
once, pinned to its node, ``num_cpus=0``), placed by this run's resource
use, with a queue for those that fit no node now; output and exits reach
the listener in order through the master's loop (the pump thread only wakes
it through a pipe) and exits are acknowledged; a host actor that dies with
its node makes every attempt on it lost naming the node, one that dies on a
live node ends them with SIGKILL; a resumed master finds the host actors by
name and takes back the attempts they run.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.backends import AttemptHandle, AttemptSpec, Stream
from orchestrator.loop import Loop


class ActorDied(Exception):
    pass


class Unavailable(Exception):
    pass


class _Method:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeHost:
    """A host actor: records starts and signals; answers the scripted polls once an
    attempt was started (a script item is a list of reports or an error), then idles."""

    def __init__(self, node: str, polls: list[Any] | None = None) -> None:
        self.node = node
        self.polls = list(polls or [])
        self.starts: list[tuple[Any, ...]] = []
        self.signals: list[tuple[int, int, int]] = []
        self.acked: list[list[list[int]]] = []
        self.alive_keys: list[list[int]] = []
        outer = self

        async def start(index: int, attempt: int, argv: Any, env: Any, cwd: Any) -> dict[str, Any]:
            outer.starts.append((index, attempt, argv, env, cwd))
            return {"node": outer.node, "pid": 1}

        async def poll(wait_s: float, acked: list[list[int]]) -> dict[str, Any]:
            outer.acked.append(acked)
            await asyncio.sleep(0.02)  # allowed-sleep: the fake's long poll
            if not outer.polls or not (outer.starts or outer.alive_keys):
                return {"node": outer.node, "attempts": []}
            item = outer.polls.pop(0)
            if isinstance(item, Exception):
                raise item
            return {"node": outer.node, "attempts": item}

        async def signal(index: int, attempt: int, signum: int) -> None:
            outer.signals.append((index, attempt, signum))

        async def alive() -> list[list[int]]:
            return outer.alive_keys

        self.start, self.poll, self.signal = _Method(start), _Method(poll), _Method(signal)
        self.alive = _Method(alive)


class Affinity:
    def __init__(self, node_id: str, soft: bool) -> None:
        self.node_id, self.soft = node_id, soft


class FakeRay(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(
            RayActorError=ActorDied, ActorUnavailableError=Unavailable
        )
        self.hosts: dict[str, FakeHost] = {}  # by node: the actor a creation returns
        self.named: dict[str, FakeHost] = {}
        self.alive_nodes: set[str] = {"n1", "n2"}
        self.resources = {
            "n1": {"CPU": 2.0, "nodeA": 2.0},
            "n2": {"CPU": 2.0, "nodeB": 2.0},
        }
        self.killed: list[FakeHost] = []
        self.created: list[tuple[str, dict[str, Any]]] = []

    def is_initialized(self) -> bool:
        return True

    def remote(self, cls: Any) -> Any:
        fake = self

        class _Options:
            def __init__(self, name: str, **opts: Any) -> None:
                self.name, self.opts = name, opts

            def remote(self, *args: Any) -> FakeHost:
                fake.created.append((self.name, self.opts))
                node = self.opts["scheduling_strategy"].node_id
                actor = fake.hosts.setdefault(node, FakeHost(node))
                fake.named[self.name] = actor
                return actor

        return types.SimpleNamespace(options=_Options)

    def get_actor(self, name: str, namespace: str) -> FakeHost:
        if name not in self.named:
            raise ValueError(name)
        return self.named[name]

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        return asyncio.run(ref)

    def nodes(self) -> list[dict[str, Any]]:
        return [
            {"NodeID": n, "Alive": n in self.alive_nodes, "Resources": self.resources[n]}
            for n in ("n1", "n2")
        ]

    def kill(self, actor: FakeHost, no_restart: bool = True) -> None:
        self.killed.append(actor)

    def shutdown(self) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_output(self, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        self.events.append(("out", handle.spec.index, stream, data))

    def on_exit(self, handle: AttemptHandle, code: int) -> None:
        self.events.append(("exit", handle.spec.index, code))

    def on_waiting(self, handle: AttemptHandle, why: str) -> None:
        self.events.append(("waiting", handle.spec.index, why))

    def on_node(self, handle: AttemptHandle, node: str) -> None:
        self.events.append(("node", handle.spec.index, node))

    def on_lost(self, handle: AttemptHandle, reason: str) -> None:
        self.events.append(("lost", handle.spec.index, reason))


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRay]:
    fake = FakeRay()
    strategies = types.ModuleType("ray.util.scheduling_strategies")
    strategies.NodeAffinitySchedulingStrategy = Affinity  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.util", types.ModuleType("ray.util"))
    monkeypatch.setitem(sys.modules, "ray.util.scheduling_strategies", strategies)
    yield fake


def make(fake: FakeRay, **kw: Any) -> tuple[Any, Loop, Recorder]:
    from orchestrator.backends.ray import Cluster, RayBackend

    loop = Loop()
    rec = Recorder()
    options: dict[str, Any] = {"num_cpus": 0.5, "resources": {"nodeA": 1.0}, **kw}
    backend = RayBackend(
        loop, cluster=Cluster("127.0.0.1:1", "127.0.0.1", 1, "127.0.0.1"),
        run_id="R", heartbeat_timeout_s=10.0, stop_timeout_s=1.0, **options,
    )  # fmt: skip
    backend.bind(rec)
    return backend, loop, rec


def spec(index: int, attempt: int = 1) -> AttemptSpec:
    env = {"ORCH_MASTER_PID": "1", "RAY_AUTH_TOKEN": "secret", "X": "1"}
    return AttemptSpec(index=index, shard_id=str(index), attempt=attempt, argv=["x"], env=env)


def run_until(loop: Loop, rec: Recorder, n: int, timeout: float = 5.0) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while len(rec.events) < n and time.monotonic() < deadline:
        loop.run_once(0.05)
    return rec.events


def test_output_and_exit_arrive_in_order_and_exits_are_acknowledged(fake_ray: FakeRay) -> None:
    host = fake_ray.hosts["n1"] = FakeHost(
        "n1", [[[0, 1, b"a\n", b"", None]], [[0, 1, b"", b"e", None]], [[0, 1, b"", b"", 3]]]
    )
    backend, loop, rec = make(fake_ray)
    handle = backend.start(spec(0))
    assert handle.pid is None and backend.live() == [handle]
    events = run_until(loop, rec, 4)
    assert events == [
        ("node", 0, "n1"),
        ("out", 0, Stream.STDOUT, b"a\n"),
        ("out", 0, Stream.STDERR, b"e"),
        ("exit", 0, 3),
    ]
    assert backend.live() == []
    assert run_until_acked(loop, host, [0, 1])
    name, opts = fake_ray.created[0]
    assert name == "orch-R-host-n1" and opts["lifetime"] == "detached"
    assert opts["num_cpus"] == 0 and "resources" not in opts
    assert opts["scheduling_strategy"].node_id == "n1" and opts["scheduling_strategy"].soft is False
    backend.close()
    assert fake_ray.killed == [host]  # the run is over: its host actor goes


def run_until_acked(loop: Loop, host: FakeHost, key: list[int]) -> bool:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if any(key in acked for acked in host.acked):
            return True
        loop.run_once(0.05)
    return False


def test_attempts_share_the_nodes_host_actor_and_wait_for_room(fake_ray: FakeRay) -> None:
    # nodeA 1 per attempt, and only n1 has nodeA (2): two at a time, on n1's one host actor.
    backend, loop, rec = make(fake_ray)
    for i in range(3):
        backend.start(spec(i))
    events = run_until(loop, rec, 4)
    assert ("node", 0, "n1") in events and ("node", 1, "n1") in events
    waiting = [e for e in events if e[0] in ("out", "waiting")]
    why = "waiting for a node with CPU 0.5, nodeA 1 free (2 alive nodes, all taken by this run)"
    assert waiting == [
        ("out", 2, Stream.STDERR, f"orch: {why}\n".encode()),
        ("waiting", 2, why),
    ]
    assert [name for name, _ in fake_ray.created] == ["orch-R-host-n1"]
    host = fake_ray.hosts["n1"]
    assert [s[:2] for s in host.starts] == [(0, 1), (1, 1)]
    host.polls.append([[0, 1, b"", b"", 0]])  # the first ends: the waiting one starts
    events = run_until(loop, rec, 6)
    assert ("exit", 0, 0) in events and ("node", 2, "n1") in events
    assert [s[:2] for s in host.starts] == [(0, 1), (1, 1), (2, 1)]
    assert len(fake_ray.created) == 1
    backend.close()


def test_a_waiting_attempt_stopped_never_runs(fake_ray: FakeRay) -> None:
    backend, loop, rec = make(fake_ray, num_cpus=2.0, resources=None)
    handles = [backend.start(spec(i)) for i in range(3)]  # two nodes of 2 CPUs
    backend.signal(handles[2], 15)
    events = run_until(loop, rec, 5)  # out, waiting, exit of #2; two nodes
    assert ("exit", 2, -15) in events
    assert {s[0] for h in fake_ray.hosts.values() for s in h.starts} == {0, 1}
    assert {e[2] for e in events if e[0] == "node"} == {"n1", "n2"}  # spread
    backend.close()


def test_host_gone_with_its_node_makes_every_attempt_on_it_lost(fake_ray: FakeRay) -> None:
    fake_ray.hosts["n1"] = FakeHost("n1", [[], Unavailable(), ActorDied("node died")])
    backend, loop, rec = make(fake_ray)
    backend.start(spec(4))
    backend.start(spec(5))
    fake_ray.alive_nodes = {"n2"}
    events = run_until(loop, rec, 4)
    assert sorted(events) == [
        ("lost", 4, "node lost: n1"),
        ("lost", 5, "node lost: n1"),
        ("node", 4, "n1"),
        ("node", 5, "n1"),
    ]
    assert backend.live() == []
    backend.close()


def test_host_dead_on_a_live_node_is_a_sigkill_exit(fake_ray: FakeRay) -> None:
    fake_ray.hosts["n1"] = FakeHost("n1", [ActorDied("killed")])
    backend, loop, rec = make(fake_ray)
    backend.start(spec(2))
    assert run_until(loop, rec, 2) == [("node", 2, "n1"), ("exit", 2, -9)]
    backend.close()


def test_signals_reach_the_host_and_secrets_stay_home(fake_ray: FakeRay) -> None:
    backend, loop, rec = make(fake_ray)
    handle = backend.start(spec(1))
    run_until(loop, rec, 1)
    backend.signal(handle, 15)
    host = fake_ray.hosts["n1"]
    deadline = time.monotonic() + 5.0
    while not host.signals and time.monotonic() < deadline:
        loop.run_once(0.05)
    assert host.signals == [(1, 1, 15)]
    _, _, argv, env, _ = host.starts[0]
    assert argv == ["x"] and env["X"] == "1"
    assert "RAY_AUTH_TOKEN" not in env and "ORCH_MASTER_PID" not in env
    backend.close()


def test_reattach_finds_the_host_by_name_and_stops_what_no_shard_takes(fake_ray: FakeRay) -> None:
    left = FakeHost("n2", [[[3, 2, b"still here", b"", None]], [[3, 2, b"", b"", 0]]])
    left.alive_keys = [[3, 2], [7, 1]]
    fake_ray.named["orch-R-host-n2"] = left
    backend, loop, rec = make(fake_ray)
    assert backend.reattach(spec(5, 1)) is None
    handle = backend.reattach(spec(3, 2))
    assert handle is not None and handle.spec.attempt == 2
    events = run_until(loop, rec, 3)
    assert events == [
        ("node", 3, "n2"),
        ("out", 3, Stream.STDOUT, b"still here"),
        ("exit", 3, 0),
    ]
    backend.start(spec(5, 2))  # the reattach pass is over: (7, 1) was taken by no shard
    deadline = time.monotonic() + 5.0
    while not left.signals and time.monotonic() < deadline:
        loop.run_once(0.05)
    assert left.signals == [(7, 1, 9)]
    # The found host actor is polled, not created again; the new attempt needs nodeA: n1.
    assert [name for name, _ in fake_ray.created] == ["orch-R-host-n1"]
    backend.close()
