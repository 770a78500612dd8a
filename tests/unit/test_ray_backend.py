"""The Ray backend's bookkeeping, with a fake ``ray`` module (no cluster, no processes).

What is checked: output and exits reach the listener in order through the
master's loop (the pump thread only wakes it through a pipe), an actor that
dies with its node is reported lost naming the node, an actor that dies on a
live node is an ordinary SIGKILL exit, and a resumed master reattaches by
actor name.
"""

from __future__ import annotations

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


class FakeActor:
    """Answers ``start`` once, then the scripted polls; a poll script item may be an error."""

    def __init__(self, node: str, polls: list[Any]) -> None:
        self.node = node
        self.polls = list(polls)
        self.signals: list[int] = []
        outer = self

        class _Method:
            def __init__(self, fn: Any) -> None:
                self.remote = fn

        async def start() -> dict[str, Any]:
            return {"node": outer.node, "pid": 1}

        async def poll(wait_s: float) -> dict[str, Any]:
            item = outer.polls.pop(0) if outer.polls else ActorDied("gone")
            if isinstance(item, Exception):
                raise item
            return {"out": b"", "err": b"", "code": None, "node": outer.node, **item}

        async def signal(signum: int) -> None:
            outer.signals.append(signum)

        self.start, self.poll, self.signal = _Method(start), _Method(poll), _Method(signal)


class FakeRay(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(
            RayActorError=ActorDied, ActorUnavailableError=Unavailable
        )
        self.next_actors: list[FakeActor] = []
        self.named: dict[str, FakeActor] = {}
        self.alive_nodes: set[str] = {"n1", "n2"}
        self.killed: list[FakeActor] = []
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.args: list[tuple[Any, ...]] = []

    def is_initialized(self) -> bool:
        return True

    def remote(self, cls: Any) -> Any:
        fake = self

        class _Options:
            def __init__(self, name: str, **opts: Any) -> None:
                self.name, self.opts = name, opts

            def remote(self, *args: Any) -> FakeActor:
                fake.created.append((self.name, self.opts))
                fake.args.append(args)
                actor = fake.next_actors.pop(0)
                fake.named[self.name] = actor
                return actor

        return types.SimpleNamespace(options=_Options)

    def get_actor(self, name: str, namespace: str) -> FakeActor:
        if name not in self.named:
            raise ValueError(name)
        return self.named[name]

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n, "Alive": n in self.alive_nodes} for n in ("n1", "n2")]

    def kill(self, actor: FakeActor, no_restart: bool = True) -> None:
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

    def on_node(self, handle: AttemptHandle, node: str) -> None:
        self.events.append(("node", handle.spec.index, node))

    def on_lost(self, handle: AttemptHandle, reason: str) -> None:
        self.events.append(("lost", handle.spec.index, reason))


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRay]:
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    yield fake


def make(fake: FakeRay) -> tuple[Any, Loop, Recorder]:
    from orchestrator.backends.ray import Cluster, RayBackend

    loop = Loop()
    rec = Recorder()
    backend = RayBackend(
        loop, cluster=Cluster("127.0.0.1:1", "127.0.0.1", 1, "127.0.0.1"),
        run_id="R", heartbeat_timeout_s=10.0, stop_timeout_s=1.0, num_cpus=0.5,
        resources={"nodeA": 1.0},
    )  # fmt: skip
    backend.bind(rec)
    return backend, loop, rec


def spec(index: int, attempt: int = 1) -> AttemptSpec:
    env = {"ORCH_MASTER_PID": "1", "RAY_AUTH_TOKEN": "secret", "X": "1"}
    return AttemptSpec(index=index, shard_id=str(index), attempt=attempt, argv=["x"], env=env)


def run_until(loop: Loop, rec: Recorder, n: int) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 5.0
    while len(rec.events) < n and time.monotonic() < deadline:
        loop.run_once(0.05)
    return rec.events


def test_output_and_exit_arrive_in_order_through_the_loop(fake_ray: FakeRay) -> None:
    fake_ray.next_actors.append(FakeActor("n1", [{"out": b"a\n"}, {"err": b"e"}, {"code": 3}]))
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
    assert backend.live() == [] and len(fake_ray.killed) == 1  # its worker is given back
    name, opts = fake_ray.created[0]
    assert name == "orch-R-0-1" and opts["lifetime"] == "detached"
    assert opts["num_cpus"] == 0.5 and opts["resources"] == {"nodeA": 1.0}
    backend.close()


def test_actor_gone_with_its_node_is_lost_naming_the_node(fake_ray: FakeRay) -> None:
    fake_ray.alive_nodes = {"n1"}
    fake_ray.next_actors.append(FakeActor("n2", [{}, Unavailable(), ActorDied("node died")]))
    backend, loop, rec = make(fake_ray)
    backend.start(spec(4))
    assert run_until(loop, rec, 2) == [("node", 4, "n2"), ("lost", 4, "node lost: n2")]
    backend.close()


def test_actor_dead_on_a_live_node_is_a_sigkill_exit(fake_ray: FakeRay) -> None:
    fake_ray.next_actors.append(FakeActor("n1", [ActorDied("killed")]))
    backend, loop, rec = make(fake_ray)
    backend.start(spec(2))
    assert run_until(loop, rec, 2) == [("node", 2, "n1"), ("exit", 2, -9)]
    backend.close()


def test_signals_reach_the_actor_and_secrets_stay_home(fake_ray: FakeRay) -> None:
    actor = FakeActor("n1", [{}] * 50)
    fake_ray.next_actors.append(actor)
    backend, loop, rec = make(fake_ray)
    handle = backend.start(spec(1))
    backend.signal(handle, 15)
    deadline = time.monotonic() + 5.0
    while not actor.signals and time.monotonic() < deadline:
        loop.run_once(0.05)
    assert actor.signals == [15]
    argv, env = fake_ray.args[0][:2]
    assert argv == ["x"] and env["X"] == "1"
    assert "RAY_AUTH_TOKEN" not in env and "ORCH_MASTER_PID" not in env
    backend.close()


def test_reattach_finds_the_attempt_by_name_or_says_none(fake_ray: FakeRay) -> None:
    fake_ray.named["orch-R-3-2"] = FakeActor("n2", [{"out": b"still here"}, {"code": 0}])
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
    backend.close()
