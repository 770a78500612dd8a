"""``orch notify test CHANNEL``: send one test message and show the receiver's answer."""

from __future__ import annotations

import os
import time

import click

from orchestrator.errors import RET_FAILED, RET_OK, ConfigError
from orchestrator.notify.payload import RunFacts, facts_body
from orchestrator.notify.send import post


def notify_test(channel_name: str, config_path: str | None) -> int:
    """Exit 0 when the receiver accepted the message, 1 when it did not, 2 on bad config."""
    from orchestrator.configfile import find_config, load_config
    from orchestrator.opsconfig import ops_config

    path = find_config(config_path, os.getcwd())
    if path is None:
        raise ConfigError("no orch.toml here; give --config FILE")
    notify = ops_config(load_config(path)).notify
    channel = notify.channels.get(channel_name)
    if channel is None:
        known = ", ".join(notify.channels) or "none defined"
        raise ConfigError(f"unknown channel {channel_name!r} (known: {known})")
    secret = channel.resolved_secret()
    now = time.time()
    facts = RunFacts(run="test", name="orch notify test", state="test")
    body = facts_body("test", facts, at=now)
    body["text"] = f"orch: test message for channel {channel.name}"
    body["notification_id"] = f"test-{int(now * 1000)}"
    answer = post(channel.kind, channel.url, body, secret=secret, now_ms=int(now * 1000))
    status = f"HTTP {answer.status}" if answer.status is not None else "no HTTP answer"
    text = answer.text or "(empty body)"
    if answer.ok:
        click.echo(f"{channel.name} ({channel.kind}): delivered, {status}: {text}")
        return RET_OK
    click.echo(f"{channel.name} ({channel.kind}): not delivered, {answer.reason}: {text}", err=True)
    return RET_FAILED
