"""Schedule decisions with a fake clock: cron in a real zoneinfo zone (DST), every, overlap,
catch-up and resume. No processes, no sleeps."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.opsconfig import ops_config
from orchestrator.schedule import (
    Action,
    CatchUp,
    JobFacts,
    OnIncomplete,
    Overlap,
    Scheduler,
    ScheduleSpec,
    local_zone,
    parse_schedules,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp()


def one(s: Scheduler, now: float, **facts: object) -> tuple[Action, float, str | None] | None:
    decisions = s.decide(now, {s.specs[0].task: JobFacts(**facts)})  # type: ignore[arg-type]
    if not decisions:
        return None
    (d,) = decisions
    assert d.next_fire > d.due
    return d.action, d.due, d.run


def test_every_in_seconds_fires_on_its_interval() -> None:
    s = Scheduler([ScheduleSpec("t", every_s=5.0)], BERLIN, started_at=1000.0)
    assert s.next_fire("t", None) == 1005.0
    assert one(s, 1004.9) is None
    assert one(s, 1005.0) == (Action.FIRE, 1005.0, None)
    assert one(s, 1009.0, last_fire=1005.0) is None
    assert one(s, 1010.2, last_fire=1005.0) == (Action.FIRE, 1010.0, None)
    assert s.wake_at(1010.2, {"t": JobFacts(last_fire=1010.0)}) == 1015.0


def test_cron_every_30_minutes() -> None:
    start = at(2026, 6, 1, 10, 5)
    s = Scheduler([ScheduleSpec("t", cron="*/30 * * * *")], BERLIN, started_at=start)
    assert s.next_fire("t", None) == at(2026, 6, 1, 10, 30)
    assert one(s, at(2026, 6, 1, 10, 29)) is None
    assert one(s, at(2026, 6, 1, 10, 30)) == (Action.FIRE, at(2026, 6, 1, 10, 30), None)


def test_spring_forward_gap_fires_once_after_the_gap() -> None:
    # 2026-03-29 02:00 -> 03:00 in Berlin: 02:30 does not exist that day.
    start = at(2026, 3, 28, 12, 0)
    s = Scheduler([ScheduleSpec("t", cron="30 2 * * *")], BERLIN, started_at=start)
    due = s.next_fire("t", None)
    assert datetime.fromtimestamp(due, BERLIN).strftime("%d %H:%M %Z") == "29 03:00 CEST"
    assert one(s, due) == (Action.FIRE, due, None)
    after = s.next_fire("t", due)
    assert datetime.fromtimestamp(after, BERLIN).strftime("%d %H:%M %Z") == "30 02:30 CEST"
    assert after - due == 23.5 * 3600


def test_fall_back_hour_daily_once_hourly_twice() -> None:
    start = at(2026, 10, 24, 12, 0)
    daily = Scheduler([ScheduleSpec("d", cron="30 2 * * *")], BERLIN, started_at=start)
    first = daily.next_fire("d", None)
    second = daily.next_fire("d", first)
    assert second - first == 25 * 3600  # the long day: once, not twice
    hourly = Scheduler(
        [ScheduleSpec("h", cron="0 * * * *")], BERLIN, started_at=at(2026, 10, 25, 1, 30)
    )
    t1 = hourly.next_fire("h", None)
    t2 = hourly.next_fire("h", t1)
    t3 = hourly.next_fire("h", t2)
    shown = [datetime.fromtimestamp(t, BERLIN).strftime("%H:%M %Z") for t in (t1, t2, t3)]
    assert shown == ["02:00 CEST", "02:00 CET", "03:00 CET"]
    assert t2 - t1 == t3 - t2 == 3600


def test_overlap_skip_queue_replace() -> None:
    def sched(overlap: Overlap) -> Scheduler:
        return Scheduler([ScheduleSpec("t", every_s=60.0, overlap=overlap)], BERLIN, started_at=0.0)

    assert one(sched(Overlap.SKIP), 60.0, live_run="r1") == (Action.SKIP, 60.0, None)
    assert one(sched(Overlap.QUEUE), 60.0, live_run="r1") == (Action.QUEUE, 60.0, None)
    assert one(sched(Overlap.REPLACE), 60.0, live_run="r1") == (Action.REPLACE, 60.0, "r1")
    # the queued fire starts once the live run has ended, before the next interval
    q = sched(Overlap.QUEUE)
    assert one(q, 70.0, last_fire=60.0, queued=True, live_run="r1") is None
    assert one(q, 75.0, last_fire=60.0, queued=True) == (Action.FIRE, 75.0, None)


def test_catch_up_once_within_the_deadline() -> None:
    spec = ScheduleSpec("t", cron="0 * * * *")  # hourly; default catch_up once, deadline 1h
    last = at(2026, 6, 1, 8, 0)
    s = Scheduler([spec], BERLIN, started_at=at(2026, 6, 1, 11, 20))
    # serve was down 08:00..11:20: 09, 10, 11 were missed; 11:00 is within 1h: run once
    assert one(s, at(2026, 6, 1, 11, 20), last_fire=last) == (
        Action.FIRE,
        at(2026, 6, 1, 11, 0),
        None,
    )
    # nothing more until 12:00 once that fire is recorded
    assert one(s, at(2026, 6, 1, 11, 21), last_fire=at(2026, 6, 1, 11, 0)) is None


def test_missed_beyond_the_deadline_or_catch_up_none_is_skipped() -> None:
    spec = ScheduleSpec("t", cron="0 9 * * *")  # daily at 09:00
    s = Scheduler([spec], BERLIN, started_at=at(2026, 6, 1, 12, 0))
    last = at(2026, 5, 31, 9, 0)
    assert one(s, at(2026, 6, 1, 12, 0), last_fire=last) == (
        Action.MISSED,
        at(2026, 6, 1, 9, 0),
        None,
    )
    none = Scheduler([ScheduleSpec("t", cron="0 9 * * *", catch_up=CatchUp.NONE)], BERLIN, 0.0)
    assert one(none, at(2026, 6, 1, 9, 10), last_fire=last)[0] is Action.MISSED  # type: ignore[index]
    # a months-long outage is one decision, recorded so it is not repeated
    s2 = Scheduler([ScheduleSpec("t", cron="* * * * *")], BERLIN, started_at=0.0)
    now = at(2026, 6, 1, 12, 0)
    action, due, _ = one(s2, now, last_fire=at(2026, 1, 1, 0, 0))  # type: ignore[misc]
    assert action is Action.FIRE and due == at(2026, 6, 1, 12, 0)  # the newest minute is on time
    spec600 = ScheduleSpec("t", every_s=600.0, starting_deadline_s=300.0)
    every = Scheduler([spec600], BERLIN, started_at=0.0)
    action, due, _ = one(every, 100_000.0, last_fire=0.0)  # type: ignore[misc]
    assert action is Action.MISSED and due == 99_600.0  # keeps the interval's phase
    assert one(every, 100_001.0, last_fire=due) is None


def test_on_incomplete_resume() -> None:
    spec = ScheduleSpec("t", every_s=60.0, on_incomplete=OnIncomplete.RESUME)
    s = Scheduler([spec], BERLIN, started_at=0.0)
    assert one(s, 60.0, previous_run="r0", previous_incomplete=True) == (Action.RESUME, 60.0, "r0")
    assert one(s, 60.0, previous_run="r0", previous_incomplete=False) == (Action.FIRE, 60.0, None)
    plain = Scheduler([ScheduleSpec("t", every_s=60.0)], BERLIN, started_at=0.0)
    assert one(plain, 60.0, previous_run="r0", previous_incomplete=True) == (
        Action.FIRE,
        60.0,
        None,
    )


def test_listing_for_orch_schedules() -> None:
    s = Scheduler(
        [ScheduleSpec("a", cron="0 * * * *"), ScheduleSpec("b", every_s=30.0)],
        BERLIN,
        started_at=at(2026, 6, 1, 10, 10),
    )
    rows = s.listing({"b": JobFacts(last_fire=at(2026, 6, 1, 10, 20))})
    assert rows == [
        {
            "task": "a",
            "schedule": "0 * * * *",
            "last_fire": None,
            "next_fire": at(2026, 6, 1, 11, 0),
            "overlap": "skip",
        },
        {
            "task": "b",
            "schedule": "every 30s",
            "last_fire": at(2026, 6, 1, 10, 20),
            "next_fire": at(2026, 6, 1, 10, 20) + 30,
            "overlap": "skip",
        },
    ]


def test_local_zone_follows_tz() -> None:
    assert str(local_zone({"TZ": "Europe/Berlin"})) == "Europe/Berlin"
    assert local_zone({"TZ": "Not/AZone"}) is not None


def test_config_parses_schedule_keys(tmp_path: Path) -> None:
    path = tmp_path / "orch.toml"
    path.write_text(
        '[tasks.a]\ncommand = "x"\nsplit = 1\nschedule = "*/30  * * * *"\noverlap = "queue"\n'
        'catch_up = "none"\nstarting_deadline = "10m"\non_incomplete = "resume"\n'
        '[tasks.b]\ncommand = "x"\nsplit = 1\nevery = "15s"\n'
    )
    schedules = ops_config(load_config(str(path))).schedules
    assert schedules["a"] == ScheduleSpec(
        "a",
        cron="*/30 * * * *",
        overlap=Overlap.QUEUE,
        catch_up=CatchUp.NONE,
        starting_deadline_s=600.0,
        on_incomplete=OnIncomplete.RESUME,
    )
    assert schedules["b"].every_s == 15.0


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"schedule": "*/30 * * *"}, "[tasks.t] schedule: invalid cron expression '*/30 * * *'"),
        ({"schedule": "61 * * * *"}, "[tasks.t] schedule: invalid cron expression '61 * * * *'"),
        ({"schedule": 5}, "[tasks.t] schedule: expected a cron expression"),
        ({"every": "3x"}, "[tasks.t] every (schedule): invalid duration '3x'"),
        ({"every": "0s"}, "[tasks.t] every (schedule): must be at least 1s"),
        ({"schedule": "* * * * *", "every": "1m"}, "[tasks.t] schedule: give schedule or every"),
        ({"overlap": "skip"}, "[tasks.t] overlap: needs schedule or every"),
        ({"every": "1m", "overlap": "wait"}, "[tasks.t] overlap: 'wait' is not one of"),
        ({"every": "1m", "starting_deadline": "soon"}, "[tasks.t] starting_deadline: invalid"),
    ],
)
def test_bad_schedules_are_one_line_errors(keys: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_schedules({"t": keys}, where="orch.toml")
    assert str(info.value).startswith("orch.toml: " + expected)
    assert "\n" not in str(info.value)


def test_bad_schedule_fails_whenever_orch_toml_is_read(tmp_path: Path) -> None:
    path = tmp_path / "orch.toml"
    path.write_text('[tasks.a]\ncommand = "x"\nsplit = 1\nschedule = "every day"\n')
    with pytest.raises(ConfigError, match=r"\[tasks.a\] schedule: invalid cron expression"):
        load_config(str(path))
