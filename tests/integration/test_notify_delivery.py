"""Notification delivery against a real HTTP receiver on 127.0.0.1, real SQLite outbox.

Timing-dependent logic (backoff, rate limits, leases, give-up) runs with an
injected clock through ``Deliverer.step``; the detached deliverer process and
``orch notify test`` run for real.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.world import ORCH, orch_env, poll_for
from notify_receiver import Receiver

from orchestrator.notify.deliver import (
    Deliverer,
    DeliveryPolicy,
    launch_deliverer,
    read_channels,
    write_channels,
)
from orchestrator.notify.outbox import Outbox
from orchestrator.notify.payload import FailedShard, RunFacts, facts_body
from orchestrator.notifyconfig import Channel, Kind
from orchestrator.store import RunRow, Store

REQUIRED = {"event", "run", "name", "state", "items_done", "items_total", "rate", "eta_s"}
SECRET = "SECshh-do-not-log"


T0 = time.time()


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(ding_secret=SECRET) as r:
        yield r


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    row = RunRow("20261130-120000-abcd", "crawl", {}, "split", 2, 1_800_000_000.0, None)
    Store.create(str(d / "state.db"), row, [("0", {}, 0), ("1", {}, 0)]).close()
    return d


def facts() -> RunFacts:
    return RunFacts(
        run="20261130-120000-abcd",
        name="crawl",
        state="failed",
        items_done=7,
        items_total=10,
        rate=2.5,
        eta_s=1.2,
        failed=(FailedShard("1", "exit 4", "Traceback...\nValueError: 404"),),
    )


def enqueue(
    run_dir: Path, channel: str, n: int = 1, event: str = "failed", at: float | None = None
) -> None:
    """Commit ``n`` outbox rows created at ``at`` (default T0: due for fake and real clocks)."""
    at = T0 if at is None else at
    store = Store.open(str(run_dir / "state.db"))
    for _ in range(n):
        store.add_notification(channel, event, facts_body(event, facts(), at=at), at)
    store.commit()
    store.close()


def deliverer(run_dir: Path, channels: list[Channel], clock: Clock, **kw: object) -> Deliverer:
    lines: list[str] = []
    d = Deliverer(
        Outbox(str(run_dir / "state.db")),
        {c.name: c for c in channels},
        clock=clock,
        log=lines.append,
        policy=DeliveryPolicy(**kw),  # type: ignore[arg-type]
    )
    d.lines = lines  # type: ignore[attr-defined]
    return d


def step_now(d: Deliverer) -> float | None:
    """Step until nothing more is due at this instant (a step claims at most 20 rows)."""
    for _ in range(100):
        wait = d.step()
        if wait != 0:
            return wait
    raise AssertionError("rows stay due forever")


def states(run_dir: Path) -> list[str]:
    box = Outbox(str(run_dir / "state.db"))
    try:
        return [
            "delivered" if r["delivered_at"] else "given_up" if r["given_up_at"] else "pending"
            for r in box.rows()
        ]
    finally:
        box.close()


def test_webhook_posts_the_run_facts(receiver: Receiver, run_dir: Path) -> None:
    hook = Channel("hook", Kind.WEBHOOK, receiver.url("/hook"))
    enqueue(run_dir, "hook")
    d = deliverer(run_dir, [hook], Clock())
    assert d.step() is None  # nothing left
    (req,) = receiver.got("/hook")
    assert set(req.body) >= REQUIRED
    assert req.body["event"] == "failed" and req.body["items_done"] == 7
    assert req.body["failed"] == [
        {"id": "1", "reason": "exit 4", "stderr_tail": "Traceback...\nValueError: 404"}
    ]
    assert "failed" in req.body["text"] and req.body["notification_id"].endswith("-1")
    assert states(run_dir) == ["delivered"]


def test_slack_ok_body_and_not_ok(receiver: Receiver, run_dir: Path) -> None:
    slack = Channel("s", Kind.SLACK, receiver.url("/slack"))
    receiver.script("/slack", [(200, "ok"), (400, "invalid_payload")])
    clock = Clock()
    enqueue(run_dir, "s", 2)
    d = deliverer(run_dir, [slack], clock)
    d.step()
    clock.t += 1.0  # slack: one message per second
    d.step()
    first, second = receiver.got("/slack")
    assert set(first.body) == {"text"} and "crawl" in first.body["text"]
    assert states(run_dir) == ["delivered", "given_up"]
    assert len(d.lines) == 1  # type: ignore[attr-defined]
    assert "channel 's'" in d.lines[0] and "HTTP 400" in d.lines[0]  # type: ignore[attr-defined]


def test_dingtalk_signed_and_errcode_is_a_failure(receiver: Receiver, run_dir: Path) -> None:
    good = Channel("ding", Kind.DINGTALK, receiver.url("/robot", "access_token=tok"), SECRET)
    bad = Channel("bad", Kind.DINGTALK, receiver.url("/robot", "access_token=tok"), "SECwrong")
    receiver.default = (200, '{"errcode":0,"errmsg":"ok"}')
    clock = Clock()
    enqueue(run_dir, "ding")
    enqueue(run_dir, "bad")
    d = deliverer(run_dir, [good, bad], clock)
    wait = d.step()
    ok, refused = receiver.got("/robot")
    assert ok.sign_ok is True and refused.sign_ok is False
    assert ok.query["access_token"] == ["tok"]
    assert ok.body["msgtype"] == "markdown" and "crawl" in ok.body["markdown"]["text"]
    assert states(run_dir) == ["delivered", "pending"]  # errcode 310000 in a 200: retried
    assert wait == pytest.approx(1.0)  # backoff starts at about a second


def test_5xx_then_success_is_retried_with_backoff(receiver: Receiver, run_dir: Path) -> None:
    hook = Channel("hook", Kind.WEBHOOK, receiver.url("/hook"))
    receiver.script("/hook", [(500, "down"), (503, "down")])
    clock = Clock()
    enqueue(run_dir, "hook")
    d = deliverer(run_dir, [hook], clock)
    assert d.step() == pytest.approx(1.0)
    clock.t += 0.5
    d.step()
    assert len(receiver.got()) == 1  # not due yet
    clock.t += 0.5
    assert d.step() == pytest.approx(2.0)  # doubled
    clock.t += 2.0
    assert d.step() is None
    assert len(receiver.got()) == 3 and states(run_dir) == ["delivered"]


def test_rate_limits_slack_1_per_s_dingtalk_20_per_min(receiver: Receiver, run_dir: Path) -> None:
    slack = Channel("s", Kind.SLACK, receiver.url("/slack"))
    ding = Channel("d", Kind.DINGTALK, receiver.url("/robot"), SECRET)
    receiver.script("/robot", [(200, '{"errcode":0}')] * 25)
    clock = Clock()
    enqueue(run_dir, "s", 3)
    enqueue(run_dir, "d", 21)
    d = deliverer(run_dir, [slack, ding], clock)
    step_now(d)
    assert len(receiver.got("/slack")) == 1 and len(receiver.got("/robot")) == 20
    clock.t += 1.0
    step_now(d)
    assert len(receiver.got("/slack")) == 2 and len(receiver.got("/robot")) == 20
    clock.t += 59.0
    step_now(d)
    assert len(receiver.got("/slack")) == 3 and len(receiver.got("/robot")) == 21
    box = Outbox(str(run_dir / "state.db"))
    assert all(r["attempts"] == 1 for r in box.rows())  # a rate-limit wait is not a try
    box.close()


def test_final_failure_logged_once_without_secrets(receiver: Receiver, run_dir: Path) -> None:
    ding = Channel("ops", Kind.DINGTALK, receiver.url("/robot", "access_token=TOKEN123"), SECRET)
    receiver.default = (500, "boom")
    clock = Clock()
    enqueue(run_dir, "ops", at=clock.t)
    d = deliverer(run_dir, [ding], clock, give_up_after_s=120.0)
    for _ in range(30):
        wait = d.step()
        if wait is None:
            break
        clock.t += wait
    assert states(run_dir) == ["given_up"]
    assert clock.t - T0 >= 120.0  # retried for at least the two minutes
    (line,) = d.lines  # type: ignore[attr-defined]
    assert "channel 'ops'" in line and "HTTP 500" in line
    assert SECRET not in line and "TOKEN123" not in line


def test_a_lease_keeps_two_deliverers_off_one_row(receiver: Receiver, run_dir: Path) -> None:
    hook = Channel("hook", Kind.WEBHOOK, receiver.url("/hook"))
    clock = Clock()
    enqueue(run_dir, "hook")
    first = deliverer(run_dir, [hook], clock, lease_s=30.0)
    (claimed,) = first.outbox.claim(first.owner, clock(), 30.0)  # then "dies" mid-send
    second = deliverer(run_dir, [hook], clock, lease_s=30.0)
    second.step()
    assert receiver.got() == []  # the lease is live: not sent twice
    clock.t += 31.0
    assert second.step() is None
    assert len(receiver.got()) == 1
    assert first.outbox.delivered(claimed.id, first.owner, clock(), "late") is False
    assert states(run_dir) == ["delivered"]


def _deliverer_pids(run_dir: Path) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.notify.deliver" in argv and str(run_dir).encode() in argv:
            out.append(int(pid))
    return out


def test_detached_deliverer_outlives_its_starter_and_sends_once(
    receiver: Receiver, run_dir: Path
) -> None:
    write_channels(str(run_dir), (Channel("hook", Kind.WEBHOOK, receiver.url("/hook")),))
    assert stat.S_IMODE(os.stat(run_dir / "notify.json").st_mode) == 0o600
    assert set(read_channels(str(run_dir))) == {"hook"}
    enqueue(run_dir, "hook", 3)
    # The starter appends and launches, then exits at once (a foreground `orch run` returning).
    starter = (
        "import sys; from orchestrator.notify.deliver import launch_deliverer;"
        " launch_deliverer(sys.argv[1]); launch_deliverer(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", starter, str(run_dir)], check=True, timeout=30)
    try:
        assert poll_for(lambda: states(run_dir) == ["delivered"] * 3, timeout=20)
        assert len(receiver.got()) == 3
        ids = {r.body["notification_id"] for r in receiver.got()}
        assert len(ids) == 3
        assert poll_for(lambda: not _deliverer_pids(run_dir), timeout=20)  # drained: it left
    finally:
        for pid in _deliverer_pids(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_delivered_once_across_a_killed_deliverer(receiver: Receiver, run_dir: Path) -> None:
    write_channels(str(run_dir), (Channel("hook", Kind.WEBHOOK, receiver.url("/hook")),))
    receiver.default = (500, "down")
    enqueue(run_dir, "hook", 2)
    proc = launch_deliverer(str(run_dir))
    assert proc is not None
    try:
        assert poll_for(lambda: len(receiver.got()) >= 2, timeout=20)  # failing, retrying
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        receiver.default = (200, "ok")
        again = launch_deliverer(str(run_dir))
        assert again is not None  # the lock died with the first one
        assert poll_for(lambda: states(run_dir) == ["delivered"] * 2, timeout=30)
        assert len(receiver.got()) >= 3  # 2 failed tries before the kill, then the sends
        # each notification was answered "ok" once: the row records that one answer
        box = Outbox(str(run_dir / "state.db"))
        assert [r["answer"] for r in box.rows()] == ["ok", "ok"]
        box.close()
        again.wait(timeout=30)
    finally:
        for pid in _deliverer_pids(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_orch_notify_test_prints_the_answer(receiver: Receiver, tmp_path: Path) -> None:
    receiver.default = (200, '{"errcode":0,"errmsg":"ok"}')
    (tmp_path / "orch.toml").write_text(
        f'[notify.ops]\nkind = "dingtalk"\nurl = "{receiver.url("/robot", "access_token=t")}"\n'
        'secret_env = "DING_SECRET"\n'
        f'[notify.hook]\nkind = "webhook"\nurl = "{receiver.url("/down")}"\n'
    )
    receiver.script("/down", [(500, "it broke")])
    env = orch_env(tmp_path / "home", {"DING_SECRET": SECRET})
    done = subprocess.run(
        [ORCH, "notify", "test", "ops"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP 200" in done.stdout and '"errcode":0' in done.stdout
    (req,) = receiver.got("/robot")
    assert req.sign_ok is True
    bad = subprocess.run(
        [ORCH, "notify", "test", "hook"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "HTTP 500" in bad.stderr and "it broke" in bad.stderr
    unknown = subprocess.run(
        [ORCH, "notify", "test", "nope"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "orch: unknown channel 'nope' (known: ops, hook)"
    unset = subprocess.run(
        [ORCH, "notify", "test", "ops"],
        cwd=tmp_path,
        env=orch_env(tmp_path / "home"),
        capture_output=True,
        text=True,
    )
    assert unset.returncode == 2 and "DING_SECRET is not set" in unset.stderr
    assert SECRET not in unset.stderr + done.stdout


MASTER = """
import sys, time
from orchestrator.notifyconfig import Channel, Kind
from orchestrator.notify.notifier import for_run
from orchestrator.store import Store

run_dir, url = sys.argv[1], sys.argv[2]
store = Store.open(run_dir + "/state.db")
notifier = for_run(store, run_dir, [Channel("hook", Kind.WEBHOOK, url)])
store.set_shard(1, state="failed", reason="exit 4", last_error="404 forever")
notifier.on_shard_state("1", "failed", reason="exit 4", stderr_tail="404 forever")
store.set_run(state="failed", ended_at=time.time(), exit_code=1)
notifier.on_run_state("failed")
store.commit()
notifier.after_commit()
"""


def test_a_master_that_exits_at_once_still_notifies(receiver: Receiver, run_dir: Path) -> None:
    """The foreground command returns right after the run ends; the messages still go out."""
    subprocess.run(
        [sys.executable, "-c", MASTER, str(run_dir), receiver.url("/hook", "token=TOKEN42")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    try:
        assert poll_for(lambda: len(receiver.got()) == 2, timeout=20)
        gave_up, failed = (r.body for r in receiver.got())
        assert gave_up["event"] == "gave_up" and gave_up["shard"]["id"] == "1"
        assert failed["event"] == "failed" and failed["state"] == "failed"
        assert failed["failed"] == [{"id": "1", "reason": "exit 4", "stderr_tail": "404 forever"}]
        assert poll_for(lambda: states(run_dir) == ["delivered"] * 2, timeout=10)
        # the URL's token is only in the private notify.json, never in the store or a log
        for name in os.listdir(run_dir):
            if name != "notify.json":
                assert b"TOKEN42" not in (run_dir / name).read_bytes(), name
        assert b"TOKEN42" in (run_dir / "notify.json").read_bytes()
    finally:
        for pid in _deliverer_pids(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_a_receiver_that_never_answers_is_a_retryable_timeout() -> None:
    import socket

    from orchestrator.notify.send import post

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel completes the connection; nobody ever reads or answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        body = facts_body("done", facts(), at=0.0)
        answer = post(Kind.WEBHOOK, url, body, secret=None, now_ms=0, timeout_s=0.3)
        assert not answer.ok and answer.retry
        assert (
            answer.reason is not None
            and "0.3s" in answer.reason
            or "timed out" in str(answer.reason)
        )
        refused = post(Kind.WEBHOOK, "http://127.0.0.1:9/x", body, secret=None, now_ms=0)
        assert not refused.ok and refused.retry and "cannot connect" in str(refused.reason)
    finally:
        silent.close()
