"""The deliverer: sends a run's outbox, off the master loop, and outlives the run.

Started detached (own session) by ``launch_deliverer`` whenever the master
commits a notification, or by anyone who finds pending rows (``orch serve``,
a resumed master)::

    python -m orchestrator.notify.deliver RUN_DIR

* One deliverer per run at a time: it holds an exclusive ``flock`` on
  ``notify.lock``; a second one exits at once. Row leases (``outbox.py``)
  make even two at once safe.
* It exits when the outbox has been empty for ``idle_exit_s``. Before
  exiting it releases the lock and looks once more: a row committed while it
  was leaving is picked up by it or by the deliverer started for that row
  (the launcher only skips starting one while the lock is held).
* A failed send is retried with exponential backoff from ``backoff_initial_s``
  (1 s) up to ``backoff_max_s``, until ``give_up_after_s`` (5 min, so well past
  the 2 minutes after the run's end the issue asks for) has passed since the
  notification was accepted; a final 4xx gives up at once. A give-up is
  written once to the run's master.log with the channel and the reason.
* Rate limits per channel kind: Slack 1 message/s, DingTalk 20/min. A row
  held back by a limit is not counted as an attempt.
* Times in the outbox are wall-clock seconds: they must mean the same thing
  to another process and after a reboot.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from orchestrator.notify.outbox import Outbox, OutboxRow
from orchestrator.notify.send import TIMEOUT_S, Answer, post
from orchestrator.notifyconfig import Channel, Kind

__all__ = [
    "CHANNELS_JSON",
    "DeliveryPolicy",
    "Deliverer",
    "RateLimit",
    "launch_deliverer",
    "read_channels",
    "write_channels",
]

CHANNELS_JSON = "notify.json"
LOCK = "notify.lock"
STATE_DB = "state.db"
MASTER_LOG = "master.log"

#: (messages, per seconds) a receiver of this kind accepts.
RATE_LIMITS: dict[Kind, tuple[int, float]] = {Kind.SLACK: (1, 1.0), Kind.DINGTALK: (20, 60.0)}

Sender = Callable[[Channel, Mapping[str, Any], int], Answer]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """Retry and lifetime settings of a deliverer, in seconds."""

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    give_up_after_s: float = 300.0
    lease_s: float = TIMEOUT_S + 20.0
    idle_exit_s: float = 3.0
    poll_s: float = 0.1

    def backoff_s(self, failures: int) -> float:
        """The wait after the ``failures``-th failed try (1, 2, 4, ... capped)."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, failures - 1))


class RateLimit:
    """At most ``count`` sends in any ``per_s`` window (sliding), by an injected clock."""

    def __init__(self, count: int, per_s: float) -> None:
        self.count = count
        self.per_s = per_s
        self._sent: deque[float] = deque()

    def wait_s(self, now: float) -> float:
        """0 when a send is allowed now, else how long until it is."""
        while self._sent and self._sent[0] <= now - self.per_s:
            self._sent.popleft()
        if len(self._sent) < self.count:
            return 0.0
        return self._sent[0] + self.per_s - now

    def record(self, now: float) -> None:
        self._sent.append(now)


def _default_send(channel: Channel, body: Mapping[str, Any], now_ms: int) -> Answer:
    return post(channel.kind, channel.url, body, secret=channel.secret, now_ms=now_ms)


class Deliverer:
    """Sends due outbox rows; one ``step`` tries each due row once and never sleeps."""

    def __init__(
        self,
        outbox: Outbox,
        channels: Mapping[str, Channel],
        *,
        clock: Callable[[], float] = time.time,
        send: Sender = _default_send,
        log: Callable[[str], None] = lambda line: None,
        owner: str | None = None,
        policy: DeliveryPolicy | None = None,
    ) -> None:
        self.outbox = outbox
        self.channels = dict(channels)
        self.clock = clock
        self.send = send
        self.log = log
        self.owner = owner or f"{os.getpid()}-{os.urandom(4).hex()}"
        self.policy = policy or DeliveryPolicy()
        self.handled = 0
        self._limits = {
            name: RateLimit(*RATE_LIMITS[c.kind])
            for name, c in self.channels.items()
            if c.kind in RATE_LIMITS
        }

    def step(self) -> float | None:
        """Try every due row once; seconds until the next row is due, None when none is pending.

        ``handled`` tells how many rows this step tried.
        """
        rows = self.outbox.claim(self.owner, self.clock(), self.policy.lease_s)
        for row in rows:
            self._one(row)
        self.handled = len(rows)
        due = self.outbox.next_due()
        if due is None:
            return None
        return max(0.0, due - self.clock())

    def _one(self, row: OutboxRow) -> None:
        channel = self.channels.get(row.channel)
        now = self.clock()
        if channel is None:
            self._give_up(row, now, "the channel is no longer configured")
            return
        limit = self._limits.get(row.channel)
        if limit is not None:
            wait = limit.wait_s(now)
            if wait > 0:
                self.outbox.retry(row.id, self.owner, now + wait, "rate limited", count=False)
                return
            limit.record(now)
        body = dict(row.body)
        body["notification_id"] = f"{body.get('run')}-{row.id}"
        answer = self.send(channel, body, int(now * 1000))
        now = self.clock()
        if answer.ok:
            self.outbox.delivered(row.id, self.owner, now, answer.text)
            return
        reason = answer.reason or "failed"
        if not answer.retry or now - row.created_at >= self.policy.give_up_after_s:
            self._give_up(row, now, reason, tries=row.attempts + 1)
            return
        self.outbox.retry(row.id, self.owner, now + self.policy.backoff_s(row.attempts + 1), reason)

    def _give_up(self, row: OutboxRow, now: float, reason: str, tries: int | None = None) -> None:
        if self.outbox.give_up(row.id, self.owner, now, reason):
            after = f" after {tries} attempt{'s' if tries != 1 else ''}" if tries else ""
            self.log(
                f"notify: channel {row.channel!r}: gave up on the {row.event!r} notification"
                f"{after}: {reason}"
            )


# ----------------------------------------------------------------------------- files


def write_channels(
    run_dir: str, channels: tuple[Channel, ...], environ: Mapping[str, str] | None = None
) -> None:
    """Write the run's channels (secrets resolved) to its private ``notify.json`` (0600).

    Called by the run's starter before the master runs; raises ``ConfigError`` for
    a ``secret_env`` that is not set. The run directory is 0700 and the file 0600:
    the secrets are the user's own, and nothing shows this file.
    """
    data = orjson.dumps([c.to_json(environ) for c in channels])
    path = os.path.join(run_dir, CHANNELS_JSON)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_channels(run_dir: str) -> dict[str, Channel]:
    """The channels ``write_channels`` recorded; none when the run has no notify.json."""
    try:
        with open(os.path.join(run_dir, CHANNELS_JSON), "rb") as f:
            items = orjson.loads(f.read())
    except FileNotFoundError:
        return {}
    return {c.name: c for c in (Channel.from_json(item) for item in items)}


def _lock(run_dir: str) -> int | None:
    fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def deliverer_running(run_dir: str) -> bool:
    """Whether a deliverer holds the run's notify lock (a probe: never blocks)."""
    fd = _lock(run_dir)
    if fd is None:
        return True
    os.close(fd)
    return False


def launch_deliverer(run_dir: str) -> subprocess.Popen[bytes] | None:
    """Start a detached deliverer for ``run_dir`` unless one holds the lock; never waits.

    Safe to call after every commit that added outbox rows: a deliverer that is
    leaving looks at the outbox again after releasing the lock, so skipping the
    start while the lock is held cannot strand a row.
    """
    if deliverer_running(run_dir):
        return None
    log = os.open(os.path.join(run_dir, MASTER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.notify.deliver", run_dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)


def append_master_log(run_dir: str, line: str) -> None:
    """One line in master.log, with a local timestamp (O_APPEND: whole lines, any writer)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    fd = os.open(os.path.join(run_dir, MASTER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{stamp} orch: {line}\n".encode())
    finally:
        os.close(fd)


def deliver_run(
    run_dir: str,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    send: Sender = _default_send,
    policy: DeliveryPolicy | None = None,
) -> int:
    """The deliverer's whole life for one run; returns its exit code (0)."""
    policy = policy or DeliveryPolicy()
    fd = _lock(run_dir)
    if fd is None:
        return 0  # another deliverer has this run; it looks again before it leaves
    outbox = Outbox(os.path.join(run_dir, STATE_DB))
    deliverer = Deliverer(
        outbox,
        read_channels(run_dir),
        clock=clock,
        send=send,
        log=lambda line: append_master_log(run_dir, line),
        policy=policy,
    )
    try:
        idle_since: float | None = None
        while True:
            wait = deliverer.step()
            if wait is not None or deliverer.handled:
                idle_since = None
            if wait is not None:
                if wait > 0 or not deliverer.handled:  # more due now: go on at once
                    sleep(min(max(wait, policy.poll_s), 1.0))  # new rows are seen within 1 s
                continue
            now = clock()
            idle_since = now if idle_since is None else idle_since
            if now - idle_since < policy.idle_exit_s:
                sleep(policy.poll_s)
                continue
            os.close(fd)  # leaving: release, then look once more (see launch_deliverer)
            fd = -1
            if outbox.pending() == 0:
                return 0
            again = _lock(run_dir)
            if again is None:
                return 0  # the deliverer started for the new row has it
            fd, idle_since = again, None
    finally:
        if fd >= 0:
            os.close(fd)
        outbox.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isfile(os.path.join(args[0], STATE_DB)):
        print("usage: python -m orchestrator.notify.deliver RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(deliver_run(args[0]))


if __name__ == "__main__":
    main()
