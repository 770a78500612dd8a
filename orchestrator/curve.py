"""The heartbeat channel over TCP, authenticated and encrypted with ZeroMQ CURVE.

Used when attempts run on other machines (``--backend ray``); the local
backend keeps its ipc socket. Per run the master makes two key pairs, kept
in ``curve.keys`` in the run directory (0600, so ``orch resume`` binds the
same keys again and attempts that outlived their master keep talking):

- the server pair: the master's ROUTER socket is a CURVE server;
- the client pair: every attempt of the run gets it in its environment
  (``ORCH_CURVE_SERVER``, ``ORCH_CURVE_PUBLIC``, ``ORCH_CURVE_SECRET``).

A ZAP handler admits only the run's client key. A peer without it never
completes the CURVE handshake: it gets no answer and nothing it sends
reaches the master. The handler answers ZAP requests on an inproc socket
registered in the master's own loop, so no thread is involved and the
single-threaded loop stays the only owner of state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import zmq
import zmq.utils.z85

from orchestrator.loop import Loop
from shards.protocol import ENV_CURVE_PUBLIC, ENV_CURVE_SECRET, ENV_CURVE_SERVER

KEYS_FILE = "curve.keys"
#: The ZAP domain of the heartbeat socket: requests for it must carry the run's key.
DOMAIN = b"orch"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Environment variables an attempt of a TCP run gets (docs/protocol.md).
ENV_SERVER_KEY = ENV_CURVE_SERVER
ENV_PUBLIC_KEY = ENV_CURVE_PUBLIC
ENV_SECRET_KEY = ENV_CURVE_SECRET


@dataclass(frozen=True, slots=True)
class RunKeys:
    """The run's two CURVE key pairs (Z85 text, as ZeroMQ takes them)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> RunKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def client_env(self) -> dict[str, str]:
        """What an attempt needs to connect: the server's key and its own pair."""
        return {
            ENV_SERVER_KEY: self.server_public.decode(),
            ENV_PUBLIC_KEY: self.client_public.decode(),
            ENV_SECRET_KEY: self.client_secret.decode(),
        }


def load_or_create_keys(run_dir: str) -> RunKeys:
    """The run's keys from ``curve.keys`` (0600), made on the run's first start."""
    path = os.path.join(run_dir, KEYS_FILE)
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
        return RunKeys(*(data[k].encode() for k in RunKeys.__slots__))
    except FileNotFoundError:
        pass
    keys = RunKeys.generate()
    text = orjson.dumps({k: getattr(keys, k).decode() for k in RunKeys.__slots__})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    return keys


class ZapHandler:
    """Answers ZeroMQ's authentication requests: only the run's client key gets in.

    The ZAP protocol (RFC 27): a request is ``version, request id, domain,
    address, identity, mechanism, credentials...``; the reply is
    ``version, request id, status code, status text, user id, metadata``.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], loop: Loop, allowed: set[bytes]):
        self._loop = loop
        self.allowed = {zmq.utils.z85.decode(k) for k in allowed}
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._fd: int = int(self._sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
        loop.add_reader(self._fd, self.handle)
        loop.call_when_idle(self.handle)

    def handle(self) -> None:
        sock = self._sock
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # type: ignore[arg-type]
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id = frames[0], frames[1] if len(frames) > 1 else b""
            if len(frames) >= 6 and frames[2] != DOMAIN:
                ok = True  # another socket of this process (the ipc control socket)
            else:
                ok = (
                    len(frames) >= 7
                    and version == b"1.0"
                    and frames[5] == b"CURVE"
                    and frames[6] in self.allowed
                )
            if not ok:
                self.refused += 1
            code, text = (b"200", b"OK") if ok else (b"400", b"not a key of this run")
            sock.send_multipart([b"1.0", request_id, code, text, b"", b""])

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        try:
            # Closing is asynchronous in libzmq; unbinding frees the name at once, so a
            # handler made next (another run in this process, a test) can bind it.
            self._sock.unbind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            pass
        self._sock.close(0)


def bind_curve(
    loop: Loop, keys: RunKeys, host: str, port: int, advertise: str, options: dict[int, int]
) -> tuple[zmq.Socket[bytes], str, Callable[[], None]]:
    """A ROUTER bound on ``tcp://host:port`` as a CURVE server admitting the run's client key.

    Returns the socket, the endpoint attempts connect to (``tcp://advertise:PORT``)
    and a function that closes the ZAP handler. ``port`` 0 picks a free port.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    zap = ZapHandler(ctx, loop, {keys.client_public})
    sock = ctx.socket(zmq.ROUTER)
    for option, value in options.items():
        sock.setsockopt(option, value)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
    try:
        if port:
            sock.bind(f"tcp://{host}:{port}")
            bound = port
        else:
            bound = sock.bind_to_random_port(f"tcp://{host}")
    except zmq.ZMQError:
        sock.close(0)
        zap.close()
        raise
    return sock, f"tcp://{advertise}:{bound}", zap.close


def connect_curve(
    sock: zmq.Socket[bytes], server_key: str, public_key: str, secret_key: str
) -> None:
    """Make ``sock`` a CURVE client of the run (before ``connect``)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
