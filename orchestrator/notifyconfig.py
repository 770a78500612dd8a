"""``[notify.NAME]`` channels and the tasks' ``notify = [...]`` lists.

``parse_notify`` takes the parsed TOML tables and gives frozen objects; every
mistake is a one-line ``ConfigError`` naming the file, table and key (exit 2).
Secrets (``secret``, and the ``url`` that usually carries an access token) are
kept out of ``repr`` so they never reach a log line by accident.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError, OrchError
from orchestrator.units import parse_duration

__all__ = [
    "DEFAULT_EVENTS",
    "EVENTS",
    "Channel",
    "Kind",
    "NotifyConfig",
    "parse_notify",
]


class Kind(enum.StrEnum):
    """How a channel's receiver wants its messages."""

    WEBHOOK = "webhook"
    SLACK = "slack"
    DINGTALK = "dingtalk"


#: Events a channel may subscribe to. ``digest`` is sent by ``digest_every``, not listed.
EVENTS = ("done", "failed", "stopped", "gave_up", "hung", "stalled")
DEFAULT_EVENTS = frozenset({"done", "failed", "gave_up"})
_KEYS = ("kind", "url", "secret", "secret_env", "events", "digest_every")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class Channel:
    """One named channel. ``url`` and ``secret`` are secrets: not in ``repr``."""

    name: str
    kind: Kind
    url: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    events: frozenset[str] = DEFAULT_EVENTS
    digest_every_s: float | None = None

    def resolved_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The signing secret: ``secret``, else ``$secret_env`` (ConfigError when unset)."""
        if self.secret is not None or self.secret_env is None:
            return self.secret
        env = os.environ if environ is None else environ
        value = env.get(self.secret_env)
        if not value:
            raise ConfigError(
                f"[notify.{self.name}] secret_env: environment variable"
                f" {self.secret_env} is not set"
            )
        return value

    def to_json(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """What the deliverer needs (secret resolved): written to the run's private notify.json."""
        return {
            "name": self.name,
            "kind": str(self.kind),
            "url": self.url,
            "secret": self.resolved_secret(environ),
            "events": sorted(self.events),
            "digest_every_s": self.digest_every_s,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Channel:
        return cls(
            name=str(d["name"]),
            kind=Kind(d["kind"]),
            url=str(d["url"]),
            secret=d.get("secret"),
            events=frozenset(d.get("events") or DEFAULT_EVENTS),
            digest_every_s=d.get("digest_every_s"),
        )


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """Every channel by name, and each task's channel names (tasks without ``notify`` absent)."""

    channels: Mapping[str, Channel] = field(default_factory=dict)
    tasks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def for_task(self, task: str) -> tuple[Channel, ...]:
        """The channels a run of ``task`` notifies (none when the task names none)."""
        return tuple(self.channels[name] for name in self.tasks.get(task, ()))


def parse_notify(
    tables: Mapping[str, Any], extras: Mapping[str, Mapping[str, Any]], *, where: str
) -> NotifyConfig:
    """Build the notify config from the top-level ``tables`` and per-task ``extras``.

    ``tables`` is the parsed TOML document without ``tasks`` (``tables["notify"]``
    holds the channels); ``extras`` maps task name -> its extra keys. ``where``
    is the file as shown to the user.
    """
    raw = tables.get("notify", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'notify' must be a table of [notify.NAME] channels")
    channels = {name: _channel(name, table, where) for name, table in raw.items()}
    tasks: dict[str, tuple[str, ...]] = {}
    for task, keys in extras.items():
        if "notify" not in keys:
            continue
        names = keys["notify"]
        here = f"{where}: [tasks.{task}] notify"
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{here}: expected an array of channel names")
        for name in names:
            if name not in channels:
                known = ", ".join(channels) or "none defined"
                raise ConfigError(f"{here}: unknown channel {name!r} (known: {known})")
        tasks[task] = tuple(dict.fromkeys(names))
    return NotifyConfig(channels=channels, tasks=tasks)


def _channel(name: str, table: object, where: str) -> Channel:
    here = f"{where}: [notify.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{here} must be a table")
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{here}: channel name {name!r}: use letters, digits, '_', '-', '.'")
    for key in table:
        if key not in _KEYS:
            raise ConfigError(f"{here}: unknown key {key!r} (keys: {', '.join(_KEYS)})")
    kind = table.get("kind")
    if kind is None:
        raise ConfigError(f"{here}: missing kind (one of webhook, slack, dingtalk)")
    if kind not in tuple(Kind):
        raise ConfigError(f"{here} kind: unknown kind {kind!r} (one of webhook, slack, dingtalk)")
    url = table.get("url")
    if url is None:
        raise ConfigError(f"{here}: missing url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        # The value itself is not echoed: a url usually carries an access token.
        raise ConfigError(f"{here} url: expected an http:// or https:// URL")
    secret, secret_env = table.get("secret"), table.get("secret_env")
    if secret is not None and secret_env is not None:
        raise ConfigError(f"{here}: give secret or secret_env, not both")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError(f"{here} secret: expected a non-empty string")
    if secret_env is not None and (
        not isinstance(secret_env, str) or not _ENV_RE.fullmatch(secret_env)
    ):
        raise ConfigError(f"{here} secret_env: expected an environment variable name")
    if kind != Kind.DINGTALK and (secret is not None or secret_env is not None):
        raise ConfigError(f'{here}: secret is only used by kind = "dingtalk"')
    events = table.get("events")
    if events is None:
        chosen = DEFAULT_EVENTS
    else:
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise ConfigError(f"{here} events: expected an array of event names")
        for event in events:
            if event not in EVENTS:
                raise ConfigError(
                    f"{here} events: unknown event {event!r} (one of {', '.join(EVENTS)})"
                )
        chosen = frozenset(events)
    digest = table.get("digest_every")
    digest_s: float | None = None
    if digest is not None:
        try:
            digest_s = parse_duration(digest, where=f"{here} digest_every")
        except OrchError as exc:
            raise ConfigError(str(exc)) from None
        if digest_s < 1:
            raise ConfigError(f"{here} digest_every: must be at least 1s, got {digest!r}")
    return Channel(
        name=name,
        kind=Kind(kind),
        url=url,
        secret=secret,
        secret_env=secret_env,
        events=chosen,
        digest_every_s=digest_s,
    )
