"""Liveness and progress watch for one running attempt: pure, clock injected.

Liveness and progress are different facts. A heartbeat proves the process
is not frozen; only a moving ``done`` count proves the work moves. The
master keeps one ``Watch`` per running attempt, feeds it every message, and
asks ``verdict(now)`` only when ``next_deadline()`` comes due, so a thousand
shards heartbeating every second cost a dictionary update each, not a timer
each.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.lifecycle import Intent


@dataclass(slots=True)
class Watch:
    started_at: float
    heartbeat_timeout_s: float | None
    stall_timeout_s: float | None
    require_heartbeat: bool = False
    #: The heartbeat timeout applies to this attempt even if it never speaks the
    #: ZeroMQ protocol (the user set it, or require_heartbeat).
    heartbeat_always: bool = False
    #: The attempt has sent a message over the ZeroMQ channel (the SDK or a client
    #: of its own): it has a heartbeat thread, so silence means frozen.
    sdk: bool = False
    last_beat: float | None = None
    last_move: float | None = None
    done: int | None = None
    total: int | None = None

    def beat(
        self, now: float, done: int | None = None, total: int | None = None, *, sdk: bool = True
    ) -> None:
        """Record a heartbeat, with the shard's progress count when it sent one.

        ``sdk`` is False for a ``##orch`` stdout line: a single-threaded shard
        (PHP, a Node event loop) prints between pieces of work and cannot beat
        while one blocks, so its silence is no sign of a hang unless the user
        asked for the heartbeat timeout (``heartbeat_always``).
        """
        self.sdk = self.sdk or sdk
        self.last_beat = now
        if self.last_move is None:
            self.last_move = now
        if done is not None and done != self.done:
            self.done = done
            self.last_move = now
        if total is not None:
            self.total = total

    def _beat_deadline(self) -> float | None:
        if self.heartbeat_timeout_s is None:
            return None
        if not (self.sdk or self.heartbeat_always or self.require_heartbeat):
            return None  # judged alive by its process; only the stall timeout watches it
        if self.last_beat is not None:
            return self.last_beat + self.heartbeat_timeout_s
        if self.require_heartbeat:
            return self.started_at + self.heartbeat_timeout_s
        return None

    def _stall_deadline(self) -> float | None:
        if self.stall_timeout_s is None or self.last_move is None:
            return None
        return self.last_move + self.stall_timeout_s

    def next_deadline(self) -> float | None:
        """The earliest instant at which ``verdict`` could say the attempt is stuck."""
        deadlines = [d for d in (self._beat_deadline(), self._stall_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def verdict(self, now: float) -> tuple[Intent, str] | None:
        """``(HUNG|STALLED, reason)`` when a deadline has passed, else None."""
        beat = self._beat_deadline()
        if beat is not None and now >= beat:
            assert self.heartbeat_timeout_s is not None
            since = "since start" if self.last_beat is None else "since the last one"
            return Intent.HUNG, f"hung: no heartbeat for {self.heartbeat_timeout_s:g}s ({since})"
        stall = self._stall_deadline()
        if stall is not None and now >= stall:
            assert self.stall_timeout_s is not None
            return Intent.STALLED, f"stalled: no progress for {self.stall_timeout_s:g}s"
        return None
