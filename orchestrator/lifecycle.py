"""The shard lifecycle: a pure state machine.

``step(shard, event, now, policy, rand) -> (shard, actions)`` decides what
happens to one shard when something happens to it. It makes no os calls and
reads no clock: the master feeds it events and carries out the actions it
returns, so every restart, backoff and give-up decision can be replayed in a
unit test from an event history with a fake clock.

States::

    pending --Start--> running --Exited(0)--> done
       ^                  |  \\--Exited(!=0)--> backoff --BackoffElapsed--> pending
       |                  |                    \\-> pending (first restart of a streak)
       |                  |                    \\-> failed (after max_restarts)
       |                  +--Hung/Stalled/Memory/Stop/Restart--> stopping
       |                                                          |
       +------------------ Exited ----------------------------------+
                           (stop -> stopped; hung -> backoff/failed; restart -> pending)

A slot (one of ``--jobs``) is held exactly while the shard is ``running`` or
``stopping``: a shard waiting out its backoff does not keep a sibling from
starting.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from orchestrator.config import TaskConfig
from orchestrator.settings import Restart, default


class State(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def holds_slot(self) -> bool:
        return self is State.RUNNING or self is State.STOPPING


_TERMINAL = frozenset({State.DONE, State.FAILED, State.STOPPED})


class Intent(enum.StrEnum):
    """Why the master is stopping a running attempt."""

    STOP = "stop"  # the user asked; the shard ends stopped
    SHUTDOWN = "shutdown"  # orch itself is stopping; the shard ends stopped
    RESTART = "restart"  # the user asked for a fresh attempt now
    HUNG = "hung"  # no heartbeat within the heartbeat timeout
    STALLED = "stalled"  # heartbeats but no progress within the stall timeout
    MEMORY = "memory"  # rss over max_memory
    ABORT = "abort"  # more shards failed than max_failed: the run stops; the shard ends stopped
    SCALE = "scale"  # concurrency lowered below the running count: back to pending, no failure


_FAILURE_INTENTS = frozenset({Intent.HUNG, Intent.STALLED, Intent.MEMORY})


@dataclass(frozen=True, slots=True)
class Policy:
    """The task settings the lifecycle needs, in seconds (defaults: ``settings.SETTINGS``)."""

    restart: Restart = default("restart")
    max_restarts: int = default("max_restarts")
    backoff_initial_s: float = default("backoff_initial_s")
    backoff_max_s: float = default("backoff_max_s")
    backoff_factor: float = default("backoff_factor")
    backoff_jitter: float = default("backoff_jitter")
    backoff_reset_s: float = default("backoff_reset_s")
    stop_timeout_s: float = default("stop_timeout_s")
    #: Exit statuses that end the shard failed at once: restarting cannot help.
    final_exit_codes: tuple[int, ...] = default("final_exit_codes")

    @classmethod
    def from_task(cls, task: TaskConfig) -> Policy:
        """The task's settings of the same names (the task has every field of a Policy)."""
        return cls(**{f.name: getattr(task, f.name) for f in fields(cls)})


def backoff_delay(policy: Policy, level: int, u: float) -> float:
    """Delay before restart number ``level + 2`` of a streak, ``u`` uniform in [0, 1).

    (The first restart of a streak has no delay: see ``_schedule_restart``.)

    Exponential, capped at ``backoff_max_s``, with jitter that only ever adds
    (up to ``backoff_jitter`` of the delay), so a restart never comes sooner
    than the nominal backoff allows while many shards failing together still
    spread out.
    """
    nominal = min(policy.backoff_max_s, policy.backoff_initial_s * policy.backoff_factor**level)
    return nominal * (1.0 + policy.backoff_jitter * u)


@dataclass(frozen=True, slots=True)
class Shard:
    """What the lifecycle knows of one shard. Times are monotonic seconds."""

    state: State = State.PENDING
    attempt: int = 0  # number of the current (or last) attempt; 0 before the first
    failures: int = 0  # failed attempts in a row, reset after a healthy stretch
    level: int = 0  # restarts in the current streak (short-lived attempts in a row)
    started_at: float | None = None
    intent: Intent | None = None
    reason: str | None = None  # why the shard is in its state (last exit, give-up, stop)
    ready_at: float | None = None  # when the backoff ends


# --- events -----------------------------------------------------------------


class _Value:
    """A frozen value: its fields are its ``__slots__``; equal to a value of the same
    type with equal fields, hashable, and shown as ``Exited(code=1)``.

    The events and actions below are written out instead of being dataclasses:
    ``@dataclass`` compiles five or six methods per class when the module is
    imported, ~0.7 ms a class, and this module is imported before every
    ``orch run`` spawns anything (docs/performance.md, start-up).
    """

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        type.__setattr__(cls, "__match_args__", cls.__dict__["__slots__"])  # positional patterns

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__match_args__)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, n) for n in self.__match_args__)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__match_args__)
        return f"{type(self).__name__}({inner})"

    def __reduce__(self) -> tuple[type[_Value], tuple[object, ...]]:
        # pickle and copy rebuild through __init__ (the fields in __slots__ order).
        return type(self), tuple(getattr(self, n) for n in self.__match_args__)


_set = object.__setattr__


class Start(_Value):
    """The master has a free slot for this pending shard."""

    __slots__ = ()


class Spawned(_Value):
    """The attempt's process exists."""

    __slots__ = ()


class SpawnFailed(_Value):
    """The attempt could not be started; ``reason`` is in plain words.

    A ``transient`` cause (out of file descriptors) is retried with backoff
    like a crash; any other (no such executable) ends the shard at once.
    """

    __slots__ = ("reason", "transient")
    reason: str
    transient: bool

    def __init__(self, reason: str, transient: bool = False) -> None:
        _set(self, "reason", reason)
        _set(self, "transient", transient)


class Exited(_Value):
    """The attempt's process and its whole process group are gone.

    ``code`` is the exit status, or ``-N`` when signal N killed it.
    """

    __slots__ = ("code",)
    code: int

    def __init__(self, code: int) -> None:
        _set(self, "code", code)


class Reattached(_Value):
    """A resumed master found the shard's last attempt still alive and took it back.

    The shard runs again without a new attempt (same number, nothing spawned):
    the previous master's attempt is the one live attempt.
    """

    __slots__ = ()


class Lost(_Value):
    """The attempt is gone with the machine it ran on (``node lost: <node>``).

    Its processes died with their node, so it is as ended as an ``Exited``
    one; but it was not the shard's fault: the shard is re-placed with its
    usual backoff, whatever its restart policy, and the loss is not counted
    against ``max_restarts``.
    """

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        _set(self, "reason", reason)


class Kill(_Value):
    """Liveness or memory watch says the running attempt must go."""

    __slots__ = ("intent", "reason")
    intent: Intent
    reason: str

    def __init__(self, intent: Intent, reason: str) -> None:
        _set(self, "intent", intent)
        _set(self, "reason", reason)


class StopRequested(_Value):
    __slots__ = ("intent",)
    intent: Intent

    def __init__(self, intent: Intent = Intent.STOP) -> None:
        _set(self, "intent", intent)


class RestartRequested(_Value):
    """The user wants a fresh attempt now, with the backoff reset."""

    __slots__ = ()


class BackoffElapsed(_Value):
    __slots__ = ()


class GraceElapsed(_Value):
    """The stop timeout has passed since SIGTERM: escalate to SIGKILL."""

    __slots__ = ()


Event = (
    Start
    | Spawned
    | SpawnFailed
    | Exited
    | Reattached
    | Lost
    | Kill
    | StopRequested
    | RestartRequested
    | BackoffElapsed
    | GraceElapsed
)


# --- actions ----------------------------------------------------------------


class TimerKind(enum.StrEnum):
    BACKOFF = "backoff"
    GRACE = "grace"


class Spawn(_Value):
    __slots__ = ("attempt",)
    attempt: int

    def __init__(self, attempt: int) -> None:
        _set(self, "attempt", attempt)


class Signal(_Value):
    """Send ``signum`` to the attempt's whole process group."""

    __slots__ = ("signum",)
    signum: int

    def __init__(self, signum: int) -> None:
        _set(self, "signum", signum)


class SetTimer(_Value):
    __slots__ = ("kind", "at")
    kind: TimerKind
    at: float

    def __init__(self, kind: TimerKind, at: float) -> None:
        _set(self, "kind", kind)
        _set(self, "at", at)


class CancelTimer(_Value):
    __slots__ = ("kind",)
    kind: TimerKind

    def __init__(self, kind: TimerKind) -> None:
        _set(self, "kind", kind)


Action = Spawn | Signal | SetTimer | CancelTimer

Rand = Callable[[], float]


def describe_exit(code: int) -> str:
    """``exit 3`` or ``signal 9 (SIGKILL)``."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    return f"signal {-code} ({name})"


def step(
    shard: Shard, event: Event, now: float, policy: Policy, rand: Rand
) -> tuple[Shard, list[Action]]:
    """Apply ``event`` to ``shard``; return the new shard and the actions to carry out.

    Events that make no sense in the current state (a late timer, a second
    stop) leave the shard unchanged and ask for nothing.
    """
    state = shard.state
    match event:
        case Start() if state is State.PENDING:
            attempt = shard.attempt + 1
            return (
                replace(shard, state=State.RUNNING, attempt=attempt, started_at=now, intent=None),
                [Spawn(attempt)],
            )
        case Spawned():
            return shard, []
        case Reattached() if state is State.PENDING and shard.attempt > 0:
            return replace(shard, state=State.RUNNING, started_at=now, intent=None), []
        case SpawnFailed(reason=reason, transient=transient) if state is State.RUNNING:
            what = f"cannot start: {reason}"
            if transient and policy.restart is not Restart.NEVER:
                return _schedule_restart(shard, now, policy, rand, what, True, [])
            return replace(shard, state=State.FAILED, reason=what), []
        case Exited(code=code) if state in (State.RUNNING, State.STOPPING):
            return _exited(shard, code, now, policy, rand)
        case Lost(reason=reason) if state in (State.RUNNING, State.STOPPING):
            return _lost(shard, reason, now, policy, rand)
        case Kill(intent=intent, reason=reason) if state is State.RUNNING:
            return _begin_stop(shard, intent, now, policy, reason)
        case StopRequested(intent=intent):
            return _stop_requested(shard, intent, now, policy)
        case RestartRequested():
            return _restart_requested(shard, now, policy)
        case BackoffElapsed() if state is State.BACKOFF:
            return replace(shard, state=State.PENDING, ready_at=None), []
        case GraceElapsed() if state is State.STOPPING:
            return shard, [Signal(signal.SIGKILL)]
    return shard, []


def _begin_stop(
    shard: Shard, intent: Intent, now: float, policy: Policy, reason: str | None = None
) -> tuple[Shard, list[Action]]:
    new = replace(shard, state=State.STOPPING, intent=intent, reason=reason or shard.reason)
    return new, [Signal(signal.SIGTERM), SetTimer(TimerKind.GRACE, now + policy.stop_timeout_s)]


_STOP_REASONS = {
    Intent.STOP: "stopped by user",
    Intent.SHUTDOWN: "stopped: orch is shutting down",
    Intent.ABORT: "stopped: more shards failed than max_failed allows",
}
_ENDS_STOPPED = frozenset(_STOP_REASONS)


def _stop_requested(
    shard: Shard, intent: Intent, now: float, policy: Policy
) -> tuple[Shard, list[Action]]:
    if intent is Intent.SCALE:
        # Only a running attempt makes room; anything else has no slot to give back.
        if shard.state is State.RUNNING:
            return _begin_stop(shard, intent, now, policy, "scaled down: waiting for a slot")
        return shard, []
    reason = _STOP_REASONS.get(intent, _STOP_REASONS[Intent.SHUTDOWN])
    match shard.state:
        case State.RUNNING:
            return _begin_stop(shard, intent, now, policy, reason)
        case State.STOPPING:
            # A stop overrides a restart or a hung kill already under way;
            # the grace timer already running keeps its deadline.
            return replace(shard, intent=intent, reason=reason), []
        case State.BACKOFF:
            stopped = replace(shard, state=State.STOPPED, reason=reason, ready_at=None)
            return stopped, [CancelTimer(TimerKind.BACKOFF)]
        case State.PENDING:
            return replace(shard, state=State.STOPPED, reason=reason), []
    return shard, []


def _restart_requested(shard: Shard, now: float, policy: Policy) -> tuple[Shard, list[Action]]:
    match shard.state:
        case State.RUNNING:
            return _begin_stop(shard, Intent.RESTART, now, policy, "restarted by user")
        case State.STOPPING:
            return shard, []
        case State.BACKOFF:
            fresh = replace(
                shard,
                state=State.PENDING,
                failures=0,
                level=0,
                ready_at=None,
                reason="restarted by user",
            )
            return fresh, [CancelTimer(TimerKind.BACKOFF)]
        case State.DONE | State.FAILED | State.STOPPED:
            fresh = replace(
                shard, state=State.PENDING, failures=0, level=0, reason="restarted by user"
            )
            return fresh, []
    return shard, []


def _exited(
    shard: Shard, code: int, now: float, policy: Policy, rand: Rand
) -> tuple[Shard, list[Action]]:
    actions: list[Action] = []
    if shard.state is State.STOPPING:
        actions.append(CancelTimer(TimerKind.GRACE))
        intent = shard.intent
        if intent in _ENDS_STOPPED:
            return replace(shard, state=State.STOPPED, intent=None), actions
        if intent is Intent.RESTART:
            fresh = replace(shard, state=State.PENDING, failures=0, level=0, intent=None)
            return fresh, actions
        if intent is Intent.SCALE:
            # Not a failure: the streak and backoff level stay as they were.
            return replace(shard, state=State.PENDING, intent=None), actions
        # hung, stalled, memory: a failure whatever the exit status says
        return _schedule_restart(
            shard, now, policy, rand, shard.reason or str(intent), True, actions
        )

    what = describe_exit(code)
    if code == 0 and policy.restart is not Restart.ALWAYS:
        return replace(shard, state=State.DONE, reason="exit 0"), actions
    if code in policy.final_exit_codes:
        return replace(shard, state=State.FAILED, reason=f"{what} (a final exit code)"), actions
    if policy.restart is Restart.NEVER:
        return replace(shard, state=State.FAILED, reason=what), actions
    return _schedule_restart(shard, now, policy, rand, what, code != 0, actions)


def _lost(
    shard: Shard, reason: str, now: float, policy: Policy, rand: Rand
) -> tuple[Shard, list[Action]]:
    actions: list[Action] = []
    if shard.state is State.STOPPING:
        actions.append(CancelTimer(TimerKind.GRACE))
        if shard.intent in _ENDS_STOPPED:
            return replace(shard, state=State.STOPPED, intent=None), actions
        if shard.intent is Intent.RESTART:
            fresh = replace(shard, state=State.PENDING, failures=0, level=0, intent=None)
            return fresh, actions
        if shard.intent is Intent.SCALE:
            return replace(shard, state=State.PENDING, intent=None), actions
    # Running, or being killed as hung (its heartbeats stopped with the node): re-place it.
    return _schedule_restart(shard, now, policy, rand, reason, False, actions)


def _schedule_restart(
    shard: Shard,
    now: float,
    policy: Policy,
    rand: Rand,
    what: str,
    failed: bool,
    actions: list[Action],
) -> tuple[Shard, list[Action]]:
    """Restart at once, back off, or give up after ``max_restarts`` failures in a row.

    The first restart of a streak (a shard's first failure, or the first
    after an attempt that ran ``backoff_reset_s``) has no wait: a shard that
    dies once after a healthy stretch is back in milliseconds. Later restarts
    of the same streak wait ``backoff_initial_s``, then ``backoff_factor``
    times longer each, so a crash loop stays paced and still gives up.
    """
    ran_s = now - shard.started_at if shard.started_at is not None else 0.0
    healthy = ran_s >= policy.backoff_reset_s
    failures = 0 if healthy else shard.failures
    level = 0 if healthy else shard.level
    if failed:
        failures += 1
        if failures > policy.max_restarts:
            attempts = shard.attempt
            reason = (
                f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} (last: {what})"
            )
            return (
                replace(shard, state=State.FAILED, failures=failures, intent=None, reason=reason),
                actions,
            )
    delay = 0.0 if level == 0 else backoff_delay(policy, level - 1, rand())
    base = replace(shard, failures=failures, level=level + 1, intent=None, reason=what)
    if delay <= 0.0:
        return replace(base, state=State.PENDING, ready_at=None), actions
    ready_at = now + delay
    actions.append(SetTimer(TimerKind.BACKOFF, ready_at))
    return replace(base, state=State.BACKOFF, ready_at=ready_at), actions
