"""Where attempts run.

A backend starts an attempt's process, signals its whole process group, and
reports its output and its end to a ``Listener``. The master never touches a
process directly, so another backend (a cluster engine) can run the same
attempts elsewhere while the master keeps shard state, restarts, heartbeats,
progress and checkpoints.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import zmq

    from orchestrator.loop import Loop

    #: A socket bound by a backend, and the endpoint its attempts connect to.
    BoundSocket = tuple[zmq.Socket[bytes], str]


class Stream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class AttemptSpec:
    """Everything needed to start one attempt; argv and env are fully rendered."""

    index: int
    shard_id: str
    attempt: int
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None


@dataclass(slots=True)
class AttemptHandle:
    """A started attempt as the master sees it."""

    spec: AttemptSpec
    pid: int | None
    pgid: int | None
    create_time: float | None


class Listener(Protocol):
    def on_output(self, handle: AttemptHandle, stream: Stream, data: bytes) -> None:
        """Bytes the attempt wrote, in order, per stream."""

    def on_exit(self, handle: AttemptHandle, code: int) -> None:
        """The attempt and its whole process group are gone; ``code`` is -N for signal N."""

    def on_waiting(self, handle: AttemptHandle, why: str) -> None:
        """The attempt waits for room before it is placed (backends that place attempts):
        ``why`` in plain words, until ``on_node``."""

    def on_node(self, handle: AttemptHandle, node: str) -> None:
        """The attempt was placed on ``node`` (backends that run attempts elsewhere)."""

    def on_lost(self, handle: AttemptHandle, reason: str) -> None:
        """The attempt is gone with its node (``node lost: <node>``): not the shard's fault."""


class Backend(abc.ABC):
    """Start, signal and observe attempts.

    Every method the master calls is declared here; a backend whose attempts
    are not local processes (a cluster engine) implements the same ones.
    """

    listener: Listener | None = None
    #: True when the backend's attempts stop themselves if the master dies, so the
    #: master needs no local guardian of process groups (ray: each actor watches it).
    guards_itself = False

    def bind(self, listener: Listener) -> None:
        """Report every attempt's output and exit to ``listener`` (the master) from now on."""
        self.listener = listener

    @abc.abstractmethod
    def start(self, spec: AttemptSpec) -> AttemptHandle:
        """Start the attempt; raise ``SpawnError`` with a plain reason when it cannot start."""

    @abc.abstractmethod
    def signal(self, handle: AttemptHandle, signum: int) -> None:
        """Send ``signum`` to the attempt's whole process group (a no-op once it is gone)."""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every live attempt at once: the last resort on a second Ctrl-C."""

    @abc.abstractmethod
    def live(self) -> list[AttemptHandle]:
        """Attempts whose process group still exists."""

    @abc.abstractmethod
    def reap(self) -> None:
        """SIGCHLD arrived: collect what exited and report the attempts that are gone."""

    @abc.abstractmethod
    def stamp(self) -> list[AttemptHandle]:
        """Fill in ``create_time`` of attempts started since the last call; return those
        that got one (the master records them: resume's guard against pid reuse)."""

    @abc.abstractmethod
    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        """Resident memory in bytes of each attempt (its whole group), None when unknown."""

    def bind_channel(self, loop: Loop, run_dir: str) -> BoundSocket | None:
        """The heartbeat channel's socket, bound where this backend's attempts reach it,
        and the endpoint they connect to; None: the default ipc socket of the run."""
        return None

    def reattach(self, spec: AttemptSpec) -> AttemptHandle | None:
        """An attempt a previous master left running, still alive: its handle, else None.

        ``spec`` carries the index, shard id and attempt number only. Backends whose
        attempts die with their master (local) have nothing to give back.
        """
        return None

    def close(self) -> None:
        """Release the backend's resources (the master has stopped every attempt)."""
