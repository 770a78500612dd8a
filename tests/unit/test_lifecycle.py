"""The shard lifecycle, replayed from event histories with a fake clock.

Each history is a list of ``(event, now, expected state, expected actions)``
replayed through the real ``lifecycle.step`` (honcho's HISTORIES style): no
processes, no sleeps, no os calls. ``rand`` is fixed, so backoff delays are
exact: with ``rand() == 0`` a delay is its nominal value. The first restart
of a streak has no wait; later ones back off 1, 2, 4, 8 s (capped).
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

import pytest

from orchestrator import lifecycle as lc
from orchestrator.config import Restart
from orchestrator.lifecycle import (
    BackoffElapsed,
    CancelTimer,
    Exited,
    GraceElapsed,
    Intent,
    Kill,
    Policy,
    RestartRequested,
    SetTimer,
    Shard,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    StopRequested,
    TimerKind,
)
from orchestrator.liveness import Watch

P = State.PENDING
R = State.RUNNING
S = State.STOPPING
B = State.BACKOFF
DONE = State.DONE
FAILED = State.FAILED
STOPPED = State.STOPPED

TERM = Signal(signal.SIGTERM)
KILL = Signal(signal.SIGKILL)


def backoff_at(t: float) -> SetTimer:
    return SetTimer(TimerKind.BACKOFF, t)


def grace_at(t: float) -> SetTimer:
    return SetTimer(TimerKind.GRACE, t)


CANCEL_BACKOFF = CancelTimer(TimerKind.BACKOFF)
CANCEL_GRACE = CancelTimer(TimerKind.GRACE)

#: Round numbers: 1, 2, 4, 8 then capped at 8; healthy after 60 s; 10 s grace.
POLICY = Policy(
    restart=Restart.ON_FAILURE, max_restarts=5, backoff_initial_s=1.0, backoff_max_s=8.0,
    backoff_factor=2.0, backoff_jitter=0.2, backoff_reset_s=60.0, stop_timeout_s=10.0,
)

Step = tuple[lc.Event, float, State, list[lc.Action]]


def replay(
    history: list[Step], policy: Policy = POLICY, rand: float = 0.0, shard: Shard | None = None
) -> Shard:
    """Feed every event; check the state and the actions after each one."""
    shard = shard or Shard()
    for i, (event, now, state, actions) in enumerate(history):
        shard, got = lc.step(shard, event, now, policy, lambda: rand)
        assert (shard.state, got) == (state, actions), f"step {i}: {event!r} at t={now}"
    return shard


def fail_cycle(
    t: float, attempt: int, delay: float, ran_s: float = 0.1, code: int = 1
) -> list[Step]:
    """Start at ``t``, exit ``code`` after ``ran_s``, back off ``delay``, become pending.

    ``delay`` 0 is an immediate restart: pending at once, no timer.
    """
    end = t + ran_s
    started: list[Step] = [(Start(), t, R, [Spawn(attempt)]), (Spawned(), t, R, [])]
    if delay == 0.0:
        return [*started, (Exited(code), end, P, [])]
    return [
        *started,
        (Exited(code), end, B, [backoff_at(end + delay)]),
        (BackoffElapsed(), end + delay, P, []),
    ]


# --- backoff ------------------------------------------------------------------


def test_first_restart_is_immediate_then_backoff_doubles_and_is_capped_at_max() -> None:
    history: list[Step] = []
    t = 0.0
    for attempt, delay in enumerate([0.0, 1.0, 2.0, 4.0, 8.0, 8.0], start=1):
        history += fail_cycle(t, attempt, delay)
        t += 0.1 + delay
    shard = replay(history, replace(POLICY, max_restarts=6))
    assert shard.attempt == 6
    assert shard.failures == 6
    assert shard.reason == "exit 1"


@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 0.999999])
@pytest.mark.parametrize("level", range(8))
def test_jitter_only_adds_and_is_bounded(level: int, u: float) -> None:
    nominal = min(POLICY.backoff_max_s, POLICY.backoff_initial_s * 2.0**level)
    delay = lc.backoff_delay(POLICY, level, u)
    assert nominal <= delay <= nominal * (1 + POLICY.backoff_jitter)


def test_jitter_is_applied_to_the_timer_but_not_to_the_immediate_restart() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(1), 0.5, P, []),
        (Start(), 0.5, R, [Spawn(2)]),
        (Exited(1), 1.0, B, [backoff_at(1.0 + 1.0 * 1.1)]),  # u=0.5: +10%
    ], rand=0.5)


def test_backoff_resets_after_a_healthy_stretch() -> None:
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0) + fail_cycle(1.2, 3, 2.0)
    t = 1.2 + 0.1 + 2.0
    # attempt 4 runs for the whole reset window: its failure is the first of a new
    # streak, restarted at once; the next failure waits the initial backoff again
    history += fail_cycle(t, 4, 0.0, ran_s=60.0)
    history += fail_cycle(t + 60.0, 5, 1.0)
    shard = replay(history)
    assert (shard.failures, shard.level) == (2, 2)


def test_a_crash_after_a_healthy_stretch_restarts_at_once_every_time() -> None:
    """A long-running crawler that dies once an hour is never made to wait."""
    history: list[Step] = []
    for attempt in range(1, 6):
        t = (attempt - 1) * 3600.0
        history += fail_cycle(t, attempt, 0.0, ran_s=3600.0, code=-9)
    shard = replay(history, replace(POLICY, max_restarts=1))
    assert shard.state is P and shard.failures == 1


def test_a_healthy_stretch_also_resets_the_give_up_count() -> None:
    policy = replace(POLICY, max_restarts=2)
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0)
    history += fail_cycle(1.2, 3, 0.0, ran_s=61.0)  # would be failure 3 > 2 without the reset
    history += fail_cycle(62.2, 4, 1.0)
    shard = replay(history, policy)
    assert shard.state is P and shard.failures == 2


def test_just_short_of_the_reset_window_is_not_healthy() -> None:
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0, ran_s=59.9)
    replay(history)


# --- give up --------------------------------------------------------------------


def test_gives_up_after_max_restarts_failures_in_a_row() -> None:
    policy = replace(POLICY, max_restarts=2)
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0)
    history += [
        (Start(), 1.2, R, [Spawn(3)]),
        (Exited(3), 1.3, FAILED, []),  # N+1 = 3 attempts in all
        (Start(), 4.0, FAILED, []),  # terminal: nothing starts it again
        (BackoffElapsed(), 5.0, FAILED, []),
    ]
    shard = replay(history, policy)
    assert shard.attempt == 3
    assert shard.reason == "gave up after 3 attempts (last: exit 3)"


def test_max_restarts_zero_gives_up_after_the_first_failure() -> None:
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(-9), 1.0, FAILED, []),
    ], replace(POLICY, max_restarts=0))
    assert shard.reason == "gave up after 1 attempt (last: signal 9 (SIGKILL))"


def test_exit_0_is_done_and_never_restarted() -> None:
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(0), 1.0, DONE, []),
        (Start(), 2.0, DONE, []),
        (BackoffElapsed(), 3.0, DONE, []),
        (Exited(0), 4.0, DONE, []),
    ])
    assert shard.reason == "exit 0"


def test_done_after_failures() -> None:
    history = fail_cycle(0.0, 1, 0.0) + [
        (Start(), 0.1, R, [Spawn(2)]),
        (Exited(0), 2.0, DONE, []),
    ]
    assert replay(history).attempt == 2


# --- restart policies ---------------------------------------------------------------


def test_restart_always_restarts_after_exit_0_with_growing_backoff_and_never_gives_up() -> None:
    policy = replace(POLICY, restart=Restart.ALWAYS, max_restarts=1)
    history: list[Step] = []
    t = 0.0
    for attempt, delay in enumerate([0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0], start=1):
        history += fail_cycle(t, attempt, delay, ran_s=0.0, code=0)
        t += delay
    shard = replay(history, policy)
    assert shard.failures == 0 and shard.reason == "exit 0"


def test_restart_always_service_that_ran_long_restarts_at_once() -> None:
    policy = replace(POLICY, restart=Restart.ALWAYS)
    history = fail_cycle(0.0, 1, 0.0, ran_s=0.0, code=0)
    history += fail_cycle(0.0, 2, 1.0, ran_s=0.0, code=0)
    history += fail_cycle(1.0, 3, 0.0, ran_s=3600.0, code=0)
    history += fail_cycle(3601.0, 4, 1.0, ran_s=0.0, code=0)
    replay(history, policy)


def test_restart_always_still_gives_up_on_failures() -> None:
    policy = replace(POLICY, restart=Restart.ALWAYS, max_restarts=1)
    replay(fail_cycle(0.0, 1, 0.0) + [
        (Start(), 0.1, R, [Spawn(2)]),
        (Exited(2), 0.2, FAILED, []),
    ], policy)


def test_restart_never_fails_at_once_on_failure_and_is_done_on_exit_0() -> None:
    policy = replace(POLICY, restart=Restart.NEVER)
    failed = replay([(Start(), 0.0, R, [Spawn(1)]), (Exited(4), 0.1, FAILED, [])], policy)
    assert failed.reason == "exit 4"
    replay([(Start(), 0.0, R, [Spawn(1)]), (Exited(0), 0.1, DONE, [])], policy)


# --- stopping -----------------------------------------------------------------------


def test_stop_during_backoff_cancels_the_timer_and_ends_stopped() -> None:
    shard = replay(fail_cycle(-1.0, 1, 0.0) + [
        (Start(), 0.0, R, [Spawn(2)]),
        (Exited(1), 0.1, B, [backoff_at(1.1)]),
        (StopRequested(), 0.5, STOPPED, [CANCEL_BACKOFF]),
        (BackoffElapsed(), 1.1, STOPPED, []),  # a late timer changes nothing
        (Start(), 1.2, STOPPED, []),
    ])
    assert shard.reason == "stopped by user"
    assert shard.ready_at is None


def test_stop_while_running_sigterm_then_sigkill_after_grace() -> None:
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (StopRequested(), 5.0, S, [TERM, grace_at(15.0)]),
        (StopRequested(), 6.0, S, []),  # a second stop keeps the deadline
        (GraceElapsed(), 15.0, S, [KILL]),
        (Exited(-9), 15.1, STOPPED, [CANCEL_GRACE]),
        (GraceElapsed(), 16.0, STOPPED, []),
    ])
    assert shard.reason == "stopped by user"
    assert shard.failures == 0


def test_stop_while_running_that_exits_in_time_needs_no_sigkill() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (StopRequested(Intent.SHUTDOWN), 1.0, S, [TERM, grace_at(11.0)]),
        (Exited(-15), 1.2, STOPPED, [CANCEL_GRACE]),
    ])


def test_stop_of_a_pending_shard() -> None:
    shard = replay([
        (StopRequested(Intent.SHUTDOWN), 0.0, STOPPED, []),
        (Start(), 1.0, STOPPED, []),
    ])
    assert shard.reason == "stopped: orch is shutting down"
    assert shard.attempt == 0


def test_stop_of_a_terminal_shard_changes_nothing() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(0), 1.0, DONE, []),
        (StopRequested(), 2.0, DONE, []),
    ])


def test_a_stopped_attempt_that_exits_0_is_stopped_not_done() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (StopRequested(), 1.0, S, [TERM, grace_at(11.0)]),
        (Exited(0), 1.1, STOPPED, [CANCEL_GRACE]),
    ])


# --- hung, stalled, memory ------------------------------------------------------------


def test_hung_kill_counts_as_a_failure_whatever_the_exit_status() -> None:
    reason = "hung: no heartbeat for 10s (since the last one)"
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Kill(Intent.HUNG, reason), 30.0, S, [TERM, grace_at(40.0)]),
        (GraceElapsed(), 40.0, S, [KILL]),
        (Exited(0), 40.1, P, [CANCEL_GRACE]),  # first of a streak: at once
        (Start(), 40.1, R, [Spawn(2)]),
        (Kill(Intent.HUNG, reason), 50.0, S, [TERM, grace_at(60.0)]),
        (Exited(-15), 50.1, B, [CANCEL_GRACE, backoff_at(51.1)]),
        (BackoffElapsed(), 51.1, P, []),
    ])
    assert shard.reason == reason
    assert shard.failures == 2


def test_hung_kills_give_up_after_max_restarts() -> None:
    policy = replace(POLICY, max_restarts=1)
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Kill(Intent.STALLED, "stalled: no progress for 5s"), 6.0, S, [TERM, grace_at(16.0)]),
        (Exited(-15), 6.1, P, [CANCEL_GRACE]),
        (Start(), 7.1, R, [Spawn(2)]),
        (Kill(Intent.MEMORY, "rss over 1 GiB"), 8.0, S, [TERM, grace_at(18.0)]),
        (Exited(-15), 8.1, FAILED, [CANCEL_GRACE]),
    ], policy)
    assert shard.reason == "gave up after 2 attempts (last: rss over 1 GiB)"


def test_kill_of_a_shard_not_running_is_ignored() -> None:
    replay([
        (Kill(Intent.HUNG, "hung"), 0.0, P, []),
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(1), 0.1, P, []),
        (Start(), 0.1, R, [Spawn(2)]),
        (Exited(1), 0.2, B, [backoff_at(1.2)]),
        (Kill(Intent.HUNG, "hung"), 0.5, B, []),
    ])


def test_stop_overrides_a_hung_kill_under_way() -> None:
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Kill(Intent.HUNG, "hung"), 1.0, S, [TERM, grace_at(11.0)]),
        (StopRequested(), 2.0, S, []),
        (Exited(-15), 2.5, STOPPED, [CANCEL_GRACE]),
    ])
    assert shard.failures == 0


# --- user restart ---------------------------------------------------------------------


def test_user_restart_during_backoff_resets_the_backoff() -> None:
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0) + [
        (Start(), 1.2, R, [Spawn(3)]),
        (Exited(1), 1.3, B, [backoff_at(3.3)]),
        (RestartRequested(), 2.0, P, [CANCEL_BACKOFF]),
        (BackoffElapsed(), 3.3, P, []),
    ]
    history += fail_cycle(4.0, 4, 0.0)  # a new streak: an immediate restart again
    shard = replay(history)
    assert shard.failures == 1


def test_user_restart_while_running_stops_then_starts_fresh() -> None:
    history = fail_cycle(0.0, 1, 0.0) + fail_cycle(0.1, 2, 1.0) + [
        (Start(), 3.2, R, [Spawn(3)]),
        (RestartRequested(), 4.0, S, [TERM, grace_at(14.0)]),
        (RestartRequested(), 4.1, S, []),
        (Exited(-15), 4.2, P, [CANCEL_GRACE]),
    ]
    history += fail_cycle(4.2, 4, 0.0) + fail_cycle(4.3, 5, 1.0)
    replay(history)


@pytest.mark.parametrize("final", [0, 1])
def test_user_restart_of_a_terminal_shard(final: int) -> None:
    policy = replace(POLICY, max_restarts=0)
    end = DONE if final == 0 else FAILED
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(final), 0.1, end, []),
        (RestartRequested(), 1.0, P, []),
        (Start(), 1.0, R, [Spawn(2)]),
    ], policy)
    assert (shard.failures, shard.level) == (0, 0)


# --- spawn failures -----------------------------------------------------------------


def test_spawn_failure_not_transient_fails_at_once_without_restarts() -> None:
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (SpawnFailed("executable not found: 'nope'"), 0.0, FAILED, []),
        (BackoffElapsed(), 1.0, FAILED, []),
    ])
    assert shard.reason == "cannot start: executable not found: 'nope'"


def test_spawn_failure_transient_backs_off_and_counts_as_a_failure() -> None:
    policy = replace(POLICY, max_restarts=1)
    shard = replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (SpawnFailed("out of resources", transient=True), 0.0, P, []),
        (Start(), 0.0, R, [Spawn(2)]),
        (SpawnFailed("out of resources", transient=True), 0.0, FAILED, []),
    ], policy)
    assert "out of resources" in (shard.reason or "")


def test_transient_spawn_failure_under_restart_never_fails() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (SpawnFailed("out of resources", transient=True), 0.0, FAILED, []),
    ], replace(POLICY, restart=Restart.NEVER))


def test_zero_backoff_goes_straight_back_to_pending() -> None:
    policy = replace(POLICY, backoff_initial_s=0.0, backoff_max_s=0.0)
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (Exited(1), 0.1, P, []),
        (Start(), 0.1, R, [Spawn(2)]),
    ], policy)


def test_events_out_of_place_change_nothing() -> None:
    shard = Shard()
    for event in (Exited(0), GraceElapsed(), BackoffElapsed(), SpawnFailed("x")):
        new, actions = lc.step(shard, event, 0.0, POLICY, lambda: 0.0)
        assert (new, actions) == (shard, [])


def test_slots_are_held_exactly_while_running_or_stopping() -> None:
    holding = {s for s in State if s.holds_slot}
    assert holding == {R, S}
    assert {s for s in State if s.terminal} == {DONE, FAILED, STOPPED}


# --- liveness -------------------------------------------------------------------------


def verdict(watch: Watch, now: float) -> Any:
    got = watch.verdict(now)
    return got[0] if got else None


def test_heartbeat_timeout_counts_only_after_a_first_beat() -> None:
    w = Watch(started_at=0.0, heartbeat_timeout_s=10.0, stall_timeout_s=None)
    assert w.next_deadline() is None
    assert verdict(w, 1000.0) is None  # a shard that never uses the SDK is never "hung"
    w.beat(100.0)
    assert w.next_deadline() == 110.0
    assert verdict(w, 109.9) is None
    w.beat(105.0)
    assert w.next_deadline() == 115.0
    assert verdict(w, 114.9) is None
    got = w.verdict(115.0)
    assert got is not None and got[0] is Intent.HUNG
    assert "since the last one" in got[1]


def test_require_heartbeat_counts_from_start() -> None:
    w = Watch(started_at=5.0, heartbeat_timeout_s=10.0, stall_timeout_s=None,
              require_heartbeat=True)
    assert w.next_deadline() == 15.0
    assert verdict(w, 14.9) is None
    got = w.verdict(15.0)
    assert got is not None and got[0] is Intent.HUNG and "since start" in got[1]


def test_stall_timeout_fires_on_no_progress_despite_heartbeats() -> None:
    w = Watch(started_at=0.0, heartbeat_timeout_s=10.0, stall_timeout_s=30.0)
    w.beat(1.0, done=0, total=100)
    for t in range(2, 31):  # heartbeats every second, done never moves
        w.beat(float(t), done=0)
        assert verdict(w, float(t)) is None
    assert w.next_deadline() == 31.0
    got = w.verdict(31.0)
    assert got is not None and got[0] is Intent.STALLED
    assert got[1] == "stalled: no progress for 30s"


def test_progress_moves_the_stall_deadline() -> None:
    w = Watch(started_at=0.0, heartbeat_timeout_s=None, stall_timeout_s=30.0)
    assert w.next_deadline() is None
    w.beat(1.0, done=0)
    w.beat(20.0, done=5)
    assert w.next_deadline() == 50.0
    assert verdict(w, 49.0) is None
    w.beat(25.0, done=5)  # a beat without progress does not move it
    assert w.next_deadline() == 50.0
    assert verdict(w, 50.0) is Intent.STALLED


def test_no_timeouts_means_never_stuck() -> None:
    w = Watch(started_at=0.0, heartbeat_timeout_s=None, stall_timeout_s=None,
              require_heartbeat=True)
    w.beat(1.0, done=1)
    assert w.next_deadline() is None
    assert verdict(w, 1e9) is None


# --- node loss (the ray backend) -----------------------------------------------------


def test_node_loss_re_places_the_shard_without_counting_a_failure() -> None:
    policy = replace(POLICY, max_restarts=0)
    shard = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (lc.Lost("node lost: n1"), 5.0, P, []),  # the first restart of a streak: at once
            (Start(), 5.0, R, [Spawn(2)]),
            (lc.Lost("node lost: n2"), 7.0, B, [backoff_at(8.0)]),  # then the usual backoff
            (BackoffElapsed(), 8.0, P, []),
            (Start(), 8.0, R, [Spawn(3)]),
            (Exited(0), 10.0, DONE, []),
        ],
        policy,
    )
    assert shard.failures == 0 and shard.attempt == 3


def test_node_loss_with_restart_never_still_re_places() -> None:
    shard = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (lc.Lost("node lost: n1"), 1.0, P, []),
        ],
        replace(POLICY, restart=Restart.NEVER),
    )
    assert shard.reason == "node lost: n1"


def test_node_loss_of_a_shard_killed_as_hung_is_not_a_failure() -> None:
    shard = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (Kill(Intent.HUNG, "no heartbeat"), 10.0, S, [TERM, grace_at(20.0)]),
            (lc.Lost("node lost: n1"), 15.0, P, [CANCEL_GRACE]),
        ],
        replace(POLICY, max_restarts=0),
    )
    assert shard.failures == 0 and shard.reason == "node lost: n1"


def test_node_loss_while_stopping_ends_stopped() -> None:
    replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (StopRequested(), 1.0, S, [TERM, grace_at(11.0)]),
            (lc.Lost("node lost: n1"), 2.0, STOPPED, [CANCEL_GRACE]),
        ]
    )


def test_node_loss_while_scaled_down_goes_back_to_pending_unchanged() -> None:
    shard = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (StopRequested(Intent.SCALE), 1.0, S, [TERM, grace_at(11.0)]),
            (lc.Lost("node lost: n1"), 2.0, P, [CANCEL_GRACE]),
        ]
    )
    assert shard.failures == 0 and shard.level == 0


def test_node_loss_in_backoff_or_done_changes_nothing() -> None:
    replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (Exited(0), 1.0, DONE, []),
            (lc.Lost("node lost: n1"), 2.0, DONE, []),
        ]
    )


def test_reattached_runs_the_same_attempt_without_spawning() -> None:
    resumed = Shard(state=P, attempt=3, failures=1, level=1)
    shard = replay(
        [
            (lc.Reattached(), 50.0, R, []),  # no Spawn: the previous master's attempt lives on
            (Exited(0), 60.0, DONE, []),
        ],
        shard=resumed,
    )
    assert shard.attempt == 3


def test_reattached_needs_an_attempt_and_a_pending_shard() -> None:
    replay([(lc.Reattached(), 0.0, P, [])])  # never started: nothing to take back
    replay([(lc.Reattached(), 0.0, DONE, [])], shard=Shard(state=DONE, attempt=1))


def test_a_crash_loop_under_default_settings_is_paced_and_gives_up() -> None:
    """Defaults: at once, then 1, 2, 4, 8 s; the sixth failure in a row gives up."""
    policy = Policy()
    history: list[Step] = []
    t = 0.0
    for attempt, delay in enumerate([0.0, 1.0, 2.0, 4.0, 8.0], start=1):
        history += fail_cycle(t, attempt, delay, ran_s=0.01)
        t += 0.01 + delay
    history += [(Start(), t, R, [Spawn(6)]), (Exited(1), t + 0.01, FAILED, [])]
    shard = replay(history, policy)
    assert shard.reason == "gave up after 6 attempts (last: exit 1)"
    assert t == pytest.approx(15.05)  # 5 restarts in 15 s, not 6 in a few ms


def test_transient_spawn_failures_back_off_after_the_first_retry() -> None:
    replay([
        (Start(), 0.0, R, [Spawn(1)]),
        (SpawnFailed("out of resources", transient=True), 0.0, P, []),
        (Start(), 0.0, R, [Spawn(2)]),
        (SpawnFailed("out of resources", transient=True), 0.0, B, [backoff_at(1.0)]),
        (BackoffElapsed(), 1.0, P, []),
    ])


# --- failure policy: final exit codes; stopping the rest; scaling down ---------------------

FINAL = replace(POLICY, final_exit_codes=(4, 44))


@pytest.mark.parametrize("code", [4, 44])
def test_a_final_exit_code_fails_at_once_without_restarts(code: int) -> None:
    shard = replay([(Start(), 0.0, R, [Spawn(1)]), (Exited(code), 0.1, FAILED, [])], FINAL)
    assert shard.reason == f"exit {code} (a final exit code)"
    assert shard.attempt == 1


def test_other_exit_codes_still_restart_under_final_exit_codes() -> None:
    shard = replay([*fail_cycle(0.0, 1, 0.0, code=3), *fail_cycle(0.2, 2, 1.0, code=3)], FINAL)
    assert shard.state is P and shard.failures == 2


def test_a_final_exit_code_after_earlier_failures_still_fails_at_once() -> None:
    replay(
        [
            *fail_cycle(0.0, 1, 0.0, code=1),
            (Start(), 2.0, R, [Spawn(2)]),
            (Exited(44), 2.5, FAILED, []),
        ],
        FINAL,
    )


def test_final_exit_codes_apply_under_restart_always_too() -> None:
    policy = replace(FINAL, restart=Restart.ALWAYS)
    replay([(Start(), 0.0, R, [Spawn(1)]), (Exited(4), 0.1, FAILED, [])], policy)


def test_a_stop_after_a_final_exit_code_changes_nothing() -> None:
    replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (Exited(4), 0.1, FAILED, []),
            (StopRequested(), 1.0, FAILED, []),
        ],
        FINAL,
    )


def test_abort_stops_running_pending_and_backoff_shards_as_stopped() -> None:
    running = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (StopRequested(Intent.ABORT), 1.0, S, [TERM, grace_at(11.0)]),
            (Exited(-15), 1.5, STOPPED, [CANCEL_GRACE]),
        ]
    )
    assert running.reason == "stopped: more shards failed than max_failed allows"
    pending = replay([(StopRequested(Intent.ABORT), 0.0, STOPPED, []), (Start(), 0.1, STOPPED, [])])
    assert pending.attempt == 0
    replay(
        [
            *fail_cycle(0.0, 1, 0.0),  # the first restart is immediate, the second backs off
            (Start(), 0.2, R, [Spawn(2)]),
            (Exited(1), 0.3, B, [backoff_at(1.3)]),
            (StopRequested(Intent.ABORT), 0.5, STOPPED, [CANCEL_BACKOFF]),
        ]
    )


def test_scale_down_stops_a_running_attempt_back_to_pending_not_failed() -> None:
    shard = replay(
        [
            *fail_cycle(0.0, 1, 0.0),  # one failure in the streak before
            (Start(), 2.0, R, [Spawn(2)]),
            (StopRequested(Intent.SCALE), 5.0, S, [TERM, grace_at(15.0)]),
            (GraceElapsed(), 15.0, S, [KILL]),
            (Exited(-9), 15.1, P, [CANCEL_GRACE]),
            (Start(), 20.0, R, [Spawn(3)]),
        ]
    )
    assert shard.failures == 1 and shard.level == 1  # not a failure: the streak is unchanged


def test_scale_down_leaves_shards_without_a_slot_alone() -> None:
    replay([(StopRequested(Intent.SCALE), 0.0, P, [])])
    replay(
        [
            *fail_cycle(0.0, 1, 0.0),
            (Start(), 0.2, R, [Spawn(2)]),
            (Exited(1), 0.3, B, [backoff_at(1.3)]),
            (StopRequested(Intent.SCALE), 0.5, B, []),
        ]
    )


def test_a_user_stop_overrides_a_scale_down_under_way() -> None:
    shard = replay(
        [
            (Start(), 0.0, R, [Spawn(1)]),
            (StopRequested(Intent.SCALE), 1.0, S, [TERM, grace_at(11.0)]),
            (StopRequested(), 2.0, S, []),
            (Exited(-15), 2.5, STOPPED, [CANCEL_GRACE]),
        ]
    )
    assert shard.reason == "stopped by user"


# --- the events and actions are frozen values ----------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        lc.Start(),
        lc.Exited(3),
        lc.SpawnFailed("executable not found: 'x'", transient=True),
        lc.Kill(lc.Intent.HUNG, "no heartbeat for 30s"),
        lc.StopRequested(),
        lc.SetTimer(lc.TimerKind.GRACE, 12.5),
    ],
    ids=lambda v: type(v).__name__,
)
def test_events_and_actions_are_frozen_values(value: Any) -> None:
    import copy
    import pickle

    fields = type(value).__match_args__
    same = type(value)(*(getattr(value, n) for n in fields))
    assert same == value and hash(same) == hash(value)
    assert value != lc.Spawned() and value != object()
    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.deepcopy(value) == value
    shown = ", ".join(f"{n}={getattr(value, n)!r}" for n in fields)
    assert repr(value) == f"{type(value).__name__}({shown})"
    for name in (*fields, "other"):
        with pytest.raises(AttributeError, match="is frozen"):
            setattr(value, name, 1)
    if fields:
        with pytest.raises(AttributeError, match="is frozen"):
            delattr(value, fields[0])


def test_an_event_with_other_fields_is_another_event() -> None:
    assert lc.Exited(1) != lc.Exited(2)
    assert lc.Kill(lc.Intent.HUNG, "a") != lc.Kill(lc.Intent.STALLED, "a")
    assert lc.StopRequested() == lc.StopRequested(lc.Intent.STOP)
    assert lc.Lost("x") != lc.SpawnFailed("x")  # same fields' values, another type
    match lc.SetTimer(lc.TimerKind.BACKOFF, 3.0):
        case lc.SetTimer(kind, at):  # positional patterns, as with a dataclass
            assert (kind, at) == (lc.TimerKind.BACKOFF, 3.0)
