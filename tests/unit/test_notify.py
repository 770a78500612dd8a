"""Notifications without the network: config, payloads, signing, and the master-facing seam.

The seam (``Notifier``) writes through a real ``Store`` on a real SQLite file,
with a fake wall clock and a fake launcher.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.notify.deliver import RateLimit
from orchestrator.notify.notifier import Notifier, store_facts
from orchestrator.notify.payload import FailedShard, RunFacts, dingtalk_sign, facts_body, render
from orchestrator.notifyconfig import DEFAULT_EVENTS, Channel, Kind
from orchestrator.opsconfig import ops_config
from orchestrator.store import RunRow, Store

GOOD = """
[notify.ops]
kind = "dingtalk"
url = "https://oapi.dingtalk.com/robot/send?access_token=abc"
secret = "SECxyz"
events = ["done", "failed", "gave_up", "hung", "stalled"]
digest_every = "30m"

[notify.team]
kind = "slack"
url = "https://hooks.slack.com/services/T/B/X"

[tasks.tags]
command = "./tag.sh {id}"
split = 2
notify = ["ops", "team"]

[tasks.quiet]
command = "./q.sh"
split = 1
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "orch.toml"
    path.write_text(text)
    return str(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_channels_and_task_lists_parse(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    notify = ops_config(cfg).notify
    ops, team = notify.for_task("tags")
    assert ops.kind is Kind.DINGTALK and ops.digest_every_s == 1800.0
    assert ops.events == {"done", "failed", "gave_up", "hung", "stalled"}
    assert team.kind is Kind.SLACK and team.events == DEFAULT_EVENTS
    assert notify.for_task("quiet") == ()
    # build_task never sees the notify key: orch run of this task is unaffected
    assert "notify" not in cfg.task("tags") and cfg.extras["tags"] == {"notify": ["ops", "team"]}


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    ops = ops_config(load_config(write(tmp_path, GOOD))).notify.channels["ops"]
    shown = repr(ops)
    assert "SECxyz" not in shown and "access_token" not in shown and "ops" in shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[notify.a]\nkind = "webhook"\nurl = "http://x"\n[tasks.t]\nsplit = 1\n'
            'command = "x"\nnotify = ["a", "b"]\n',
            "orch.toml: [tasks.t] notify: unknown channel 'b' (known: a)",
        ),
        (
            '[notify.a]\nkind = "slak"\nurl = "http://x"\n',
            "orch.toml: [notify.a] kind: unknown kind 'slak' (one of webhook, slack, dingtalk)",
        ),
        ('[notify.a]\nkind = "slack"\n', "orch.toml: [notify.a]: missing url"),
        (
            '[notify.a]\nkind = "slack"\nurl = "http://x"\ndigest_every = "10 minutes"\n',
            "orch.toml: [notify.a] digest_every: invalid duration '10 minutes'",
        ),
        (
            '[notify.a]\nkind = "slack"\nurl = "http://x"\nevents = ["done", "exploded"]\n',
            "orch.toml: [notify.a] events: unknown event 'exploded'",
        ),
        (
            '[notify.a]\nkind = "slack"\nurl = "http://x"\nsecret = "s"\n',
            'orch.toml: [notify.a]: secret is only used by kind = "dingtalk"',
        ),
        (
            '[notify.a]\nkind = "webhook"\nurl = "ftp://secret-token@host"\n',
            "orch.toml: [notify.a] url: expected an http:// or https:// URL",
        ),
        (
            '[notify.a]\nkind = "webhook"\nurl = "http://x"\ncolor = "red"\n',
            "orch.toml: [notify.a]: unknown key 'color'",
        ),
    ],
)
def test_bad_config_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert error(tmp_path, text).startswith(expected)


def test_bad_url_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = error(tmp_path, '[notify.a]\nkind = "webhook"\nurl = "ftp://TOKEN@host"\n')
    assert "TOKEN" not in message


def test_secret_env_resolves_or_fails(tmp_path: Path) -> None:
    text = '[notify.d]\nkind = "dingtalk"\nurl = "https://x/robot"\nsecret_env = "DING"\n'
    channel = ops_config(load_config(write(tmp_path, text))).notify.channels["d"]
    assert channel.resolved_secret({"DING": "SEC1"}) == "SEC1"
    with pytest.raises(ConfigError, match="environment variable DING is not set"):
        channel.resolved_secret({})


def test_dingtalk_signature_matches_the_documented_formula() -> None:
    secret, ts = "SEC000", 1_700_000_000_123
    expected = base64.b64encode(
        hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256).digest()
    ).decode()
    assert dingtalk_sign(secret, ts) == expected
    body = facts_body("done", RunFacts(run="r1", name="crawl", state="done"), at=0.0)
    url, payload = render(
        Kind.DINGTALK, "https://x/robot/send?access_token=t", body, secret=secret, now_ms=ts
    )
    query = parse_qs(urlsplit(url).query)  # decodes the URL-encoded sign
    assert query == {"access_token": ["t"], "timestamp": [str(ts)], "sign": [expected]}
    assert "%2B" in url or "+" not in expected  # '+' in base64 is URL-encoded
    assert payload["msgtype"] == "markdown" and "crawl" in payload["markdown"]["title"]


def test_webhook_and_slack_bodies() -> None:
    facts = RunFacts(
        run="r1",
        name="crawl",
        state="running",
        items_done=50,
        items_total=100,
        rate=5.0,
        eta_s=10.0,
        failed=(FailedShard("m7", "exit 4", "x" * 2000),),
    )
    body = facts_body("gave_up", facts, at=1.0, shard=FailedShard("m7", "exit 4", "boom"))
    _, hook = render(Kind.WEBHOOK, "http://h", body, secret=None, now_ms=0)
    assert hook["event"] == "gave_up" and hook["eta_s"] == 10.0 and hook["rate"] == 5.0
    assert len(hook["failed"][0]["stderr_tail"]) == 500  # the tail, not the whole stderr
    assert "shard m7 gave up" in hook["text"] and "50/100" in hook["text"]
    _, slack = render(Kind.SLACK, "http://h", body, secret=None, now_ms=0)
    assert slack == {"text": hook["text"]}


def test_rate_limit_window() -> None:
    limit = RateLimit(2, 60.0)
    assert limit.wait_s(0.0) == 0
    limit.record(0.0)
    limit.record(10.0)
    assert limit.wait_s(30.0) == 30.0
    assert limit.wait_s(60.0) == 0  # the first send left the window


# ----------------------------------------------------------------------------- the seam


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Store:
    row = RunRow("run-1", "tags", {}, "split", 2, 1_700_000_000.0, None)
    return Store.create(str(tmp_path / "state.db"), row, [("a", {}, 0), ("b", {}, 0)])


def outbox(store: Store) -> list[tuple[str, str]]:
    reader = Store.open(store.path, readonly=True)
    try:
        rows = reader._query("SELECT channel, event FROM outbox ORDER BY id").fetchall()
    finally:
        reader.close()
    return [tuple(r) for r in rows]


def notifier(store: Store, launches: list[int], clock: FakeClock) -> Notifier:
    channels = [
        Channel(
            "ops",
            Kind.DINGTALK,
            "https://x",
            "S",
            events=frozenset({"failed", "hung"}),
            digest_every_s=60.0,
        ),
        Channel("team", Kind.SLACK, "https://y"),
    ]
    return Notifier(
        store, channels, lambda: store_facts(store), wall=clock, launch=lambda: launches.append(1)
    )


def test_rows_are_committed_with_the_state_change(store: Store) -> None:
    launches: list[int] = []
    n = notifier(store, launches, FakeClock())
    store.set_shard(1, state="failed", reason="exit 4", last_error="404 forever")
    n.on_shard_state("b", "failed", reason="exit 4", stderr_tail="404 forever")
    assert outbox(store) == []  # staged, not yet visible to anyone
    store.commit()
    n.after_commit()
    assert outbox(store) == [("team", "gave_up")]  # ops does not subscribe to gave_up
    assert launches == [1]
    n.after_commit()
    assert launches == [1]  # nothing new: no second deliverer


def test_shard_and_run_events_map_to_channels(store: Store) -> None:
    n = notifier(store, [], FakeClock())
    n.on_shard_state("a", "stopping", intent="hung", reason="no heartbeat for 10s")
    n.on_shard_state("a", "stopping", intent="stop")  # a user stop is not an event
    n.on_shard_state("a", "running")
    n.on_run_state("running")
    n.on_run_state("failed")
    n.on_run_state("failed")  # once
    store.commit()
    assert outbox(store) == [("ops", "hung"), ("ops", "failed"), ("team", "failed")]


def test_digest_every_with_a_fake_clock(store: Store) -> None:
    clock = FakeClock()
    n = notifier(store, [], clock)
    assert n.tick(0.0) == 60.0  # first digest one interval after the start
    assert n.tick(59.9) == 60.0
    store.commit()
    assert outbox(store) == []
    assert n.tick(60.0) == 120.0
    assert n.tick(121.0) == 181.0
    n.on_run_state("done")
    assert n.tick(500.0) is None  # no digest once the run has ended
    store.commit()
    assert outbox(store) == [("ops", "digest"), ("ops", "digest"), ("team", "done")]


def test_store_facts_reads_progress_and_failures(store: Store) -> None:
    store.set_shard(0, state="done", done=10, total=10)
    store.set_shard(1, state="failed", reason="exit 4", last_error="boom", done=3, total=10)
    store.commit()
    facts = store_facts(store)
    assert (facts.items_done, facts.items_total) == (13, 20)
    assert facts.failed == (FailedShard("b", "exit 4", "boom"),)
    assert facts.name == "tags" and facts.run == "run-1"


# ----------------------------------------------------------------------------- the loop


def test_deliverer_loop_drains_lingers_and_catches_a_late_row(tmp_path: Path) -> None:
    """deliver_run with a fake clock and sleep: a row committed while the deliverer is
    leaving is still sent, and it exits once the outbox stays empty."""
    from orchestrator.notify.deliver import DeliveryPolicy, deliver_run, write_channels
    from orchestrator.notify.send import Answer

    store = Store.create(
        str(tmp_path / "state.db"), RunRow("r", "n", {}, "split", 1, 0.0, None), [("a", {}, 0)]
    )
    write_channels(str(tmp_path), (Channel("hook", Kind.WEBHOOK, "http://127.0.0.1:9/"),))
    body = facts_body("done", RunFacts(run="r", name="n", state="done"), at=0.0)
    store.add_notification("hook", "done", body, 0.0)
    store.commit()
    clock = FakeClock()
    sent: list[str] = []
    sleeps: list[float] = []

    def send(channel: Channel, b: object, now_ms: int) -> Answer:
        sent.append(channel.name)
        return Answer(True, status=200, text="ok")

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.t += seconds
        if len(sleeps) == 20:  # idle 2 s of the 3 s linger: the master commits another row
            store.add_notification("hook", "failed", body, clock.t)
            store.commit()

    policy = DeliveryPolicy(idle_exit_s=3.0, poll_s=0.1)
    assert deliver_run(str(tmp_path), clock=clock, sleep=sleep, send=send, policy=policy) == 0
    assert sent == ["hook", "hook"]
    assert 5.0 < sum(sleeps) < 7.0  # linger, the late row, linger again, then exit
    store.close()


def test_a_second_deliverer_leaves_at_once(tmp_path: Path) -> None:
    import fcntl
    import os

    from orchestrator.notify.deliver import deliver_run

    Store.create(
        str(tmp_path / "state.db"), RunRow("r", "n", {}, "split", 1, 0.0, None), [("a", {}, 0)]
    ).close()
    fd = os.open(tmp_path / "notify.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        calls: list[float] = []
        assert deliver_run(str(tmp_path), sleep=calls.append) == 0
        assert calls == []  # it did not even wait
    finally:
        os.close(fd)
