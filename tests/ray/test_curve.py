"""The heartbeat channel over TCP with CURVE (issue 13), with real ZeroMQ sockets.

Needs no Ray: the channel is the master's own. A peer without the run's
keys gets no answer and changes nothing; the run's own client gets through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from orchestrator import curve
from orchestrator.channel import SOCKET_OPTIONS, Channel
from orchestrator.loop import Loop
from shards import protocol as p

RUN = "run-curve"


class World:
    def __init__(self, tmp: Path) -> None:
        self.loop = Loop()
        self.keys = curve.load_or_create_keys(str(tmp))
        self.received: list[p.Message] = []
        sock, endpoint, self.close_zap = curve.bind_curve(
            self.loop, self.keys, "127.0.0.1", 0, "127.0.0.1", SOCKET_OPTIONS
        )
        self.channel = Channel(self.loop, str(tmp / "unused.sock"), RUN, bound=(sock, endpoint))
        self.channel.bind(self.on_message, self.on_heartbeat)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.client_pair = (self.keys.client_public, self.keys.client_secret)

    def on_heartbeat(
        self,
        identity: bytes,
        beat: tuple[str, int, int | None, int | None, int | None],
        now: float,
    ) -> None:
        shard, attempt, done, total, _rss = beat
        self.received.append(
            p.Message(
                kind=p.Kind.HEARTBEAT, run=RUN, shard=shard, attempt=attempt, done=done, total=total
            )
        )

    def on_message(self, identity: bytes, msg: p.Message) -> None:
        self.received.append(msg)
        if msg.kind is p.Kind.CHECKPOINT:
            ack = p.Message(
                kind=p.Kind.ACK, run=msg.run, shard=msg.shard, attempt=msg.attempt, seq=msg.seq
            )
            self.channel.reply(identity, ack)

    def peer(self, server_key: bytes | None, pair: tuple[bytes, bytes] | None) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if server_key is not None and pair is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair[1])
        sock.connect(self.channel.endpoint)
        return sock

    def close(self) -> None:
        self.channel.close()
        self.close_zap()
        self.loop.close()
        self.ctx.destroy(0)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def checkpoint(seq: int) -> bytes:
    return p.encode(p.Message(p.Kind.CHECKPOINT, RUN, "0", 1, seq, 5, 10, None, 5, True))


def answered(sock: zmq.Socket[bytes], world: World, seconds: float) -> bytes | None:
    """A reply on ``sock`` while the master's loop runs for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        world.loop.run_once(0.02)
        if sock.poll(0, zmq.POLLIN):
            return sock.recv()
    return None


def test_keys_are_private_and_stable_per_run(tmp_path: Path) -> None:
    first = curve.load_or_create_keys(str(tmp_path))
    assert os.stat(tmp_path / curve.KEYS_FILE).st_mode & 0o777 == 0o600
    assert curve.load_or_create_keys(str(tmp_path)) == first  # a resumed master binds them again
    env = first.client_env()
    assert set(env) == {p.ENV_CURVE_SERVER, p.ENV_CURVE_PUBLIC, p.ENV_CURVE_SECRET}
    assert first.server_secret.decode() not in env.values()


def test_the_runs_client_is_heard_and_answered(world: World) -> None:
    assert world.channel.endpoint.startswith("tcp://127.0.0.1:")
    good = world.peer(world.keys.server_public, world.client_pair)
    good.send(checkpoint(1))
    reply = answered(good, world, 5.0)
    assert reply is not None and p.decode(reply).kind is p.Kind.ACK
    assert [m.seq for m in world.received] == [1]


@pytest.mark.parametrize("who", ["plain", "stranger", "wrong-server"])
def test_a_peer_without_the_runs_keys_gets_no_answer_and_changes_nothing(
    world: World, who: str
) -> None:
    stranger = zmq.curve_keypair()
    if who == "plain":  # no CURVE at all (NULL mechanism)
        bad = world.peer(None, None)
    elif who == "stranger":  # CURVE with the right server key but its own client pair
        bad = world.peer(world.keys.server_public, stranger)
    else:  # the run's client pair, but a forged server key
        bad = world.peer(zmq.curve_keypair()[0], world.client_pair)
    for seq in range(1, 6):
        bad.send(checkpoint(seq), zmq.NOBLOCK)
    assert answered(bad, world, 1.5) is None
    assert world.received == [] and world.channel.received == 0 and world.channel.garbage == 0
    # The run's own client still gets through afterwards.
    good = world.peer(world.keys.server_public, world.client_pair)
    good.send(checkpoint(9))
    assert answered(good, world, 5.0) is not None
    assert [m.seq for m in world.received] == [9]
