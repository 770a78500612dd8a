"""The master-facing seam: state changes in, outbox rows out, never blocking.

The master builds one ``Notifier`` per run from its ports (the store it
writes, the channels of the task, a facts provider, the wall clock and a
launcher) and calls it from its event fan-out:

* ``on_shard_state(shard_id, state, reason=, intent=, stderr_tail=)`` on every
  shard state change: ``failed`` is ``gave_up``; ``stopping`` for a hung or
  stalled attempt is ``hung`` / ``stalled``;
* ``on_run_state(state)`` when the run's state changes: ``done``, ``failed``,
  ``stopped`` are events of the same name (once per notifier);
* ``tick(now)`` from the loop's timers (monotonic ``now``): progress digests
  every ``digest_every`` while the run is live; returns the next deadline;
* ``after_commit()`` right after the store commit that carried the rows:
  starts the deliverer when rows were added (a lock probe and, at most, one
  ``Popen``; no I/O on the network, no waiting).

Rows are staged on the master's own store handle, so a notification is
accepted exactly when the state change that caused it is committed: a master
killed before that commit never announced a change it did not record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from orchestrator.notify.payload import FailedShard, RunFacts, facts_body
from orchestrator.notifyconfig import Channel

__all__ = ["Notifier", "OutboxWriter", "for_run", "store_facts"]

_SHARD_EVENTS = {"hung": "hung", "stalled": "stalled"}
_RUN_EVENTS = ("done", "failed", "stopped")


class OutboxWriter(Protocol):
    """The store's staging method for outbox rows (``Store.add_notification``)."""

    def add_notification(
        self, channel: str, event: str, body: Mapping[str, Any], created_at: float
    ) -> None: ...


class Notifier:
    """Turns a run's events into outbox rows for the channels subscribed to them."""

    def __init__(
        self,
        writer: OutboxWriter,
        channels: Sequence[Channel],
        facts: Callable[[], RunFacts],
        *,
        wall: Callable[[], float] = time.time,
        launch: Callable[[], object] | None = None,
    ) -> None:
        self.writer = writer
        self.channels = tuple(channels)
        self.facts = facts
        self.wall = wall
        self.launch = launch
        self.staged = 0  # rows added since the last after_commit
        self._ended = False
        self._next_digest: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """False when the task has no channel: the master may skip every call."""
        return bool(self.channels)

    def on_shard_state(
        self,
        shard_id: str,
        state: str,
        *,
        reason: str | None = None,
        intent: str | None = None,
        stderr_tail: str | None = None,
    ) -> None:
        if state == "failed":
            event = "gave_up"
        elif state == "stopping" and intent in _SHARD_EVENTS:
            event = _SHARD_EVENTS[intent]
        else:
            return
        self._emit(event, FailedShard(shard_id, reason, stderr_tail))

    def on_run_state(self, state: str) -> None:
        if state in _RUN_EVENTS and not self._ended:
            self._ended = True
            self._emit(state)

    def tick(self, now: float) -> float | None:
        """Stage due digests; the next digest deadline (monotonic), None when there is none."""
        if self._ended:
            return None
        due: list[Channel] = []
        for channel in self.channels:
            if channel.digest_every_s is None:
                continue
            deadline = self._next_digest.setdefault(channel.name, now + channel.digest_every_s)
            if now >= deadline:
                due.append(channel)
                self._next_digest[channel.name] = now + channel.digest_every_s
        if due:
            body = facts_body("digest", self.facts(), at=self.wall())
            for channel in due:
                self._add(channel, "digest", body)
        return min(self._next_digest.values(), default=None)

    def after_commit(self) -> None:
        """Call after the commit that carried staged rows: hands them to a deliverer."""
        if self.staged and self.launch is not None:
            self.launch()
        self.staged = 0

    def _emit(self, event: str, shard: FailedShard | None = None) -> None:
        targets = [c for c in self.channels if event in c.events]
        if not targets:
            return
        body = facts_body(event, self.facts(), at=self.wall(), shard=shard)
        for channel in targets:
            self._add(channel, event, body)

    def _add(self, channel: Channel, event: str, body: Mapping[str, Any]) -> None:
        self.writer.add_notification(channel.name, event, body, self.wall())
        self.staged += 1


def store_facts(store: Any) -> RunFacts:
    """Facts read from a run's ``Store`` (the writer sees its staged state).

    A provider for the master until it hands its own in-memory figures; rate
    is the sum of running shards' rates since their attempt started.
    """
    run = store.run()
    done, total = store.progress_totals()
    rows = store.shards(states=("failed", "running"))
    rate = 0.0
    for row in rows:
        start, last = row.get("started_at"), row.get("heartbeat_at")
        if row["state"] == "running" and start is not None and last is not None and last > start:
            moved = (row.get("done") or 0) - (row.get("start_done") or 0)
            rate += max(0.0, moved / (last - start))
    eta = (total - done) / rate if rate > 0 and total is not None else None
    failed = tuple(
        FailedShard(r["id"], r.get("reason"), r.get("last_error"))
        for r in rows
        if r["state"] == "failed"
    )
    return RunFacts(
        run=run["id"],
        name=run.get("name") or run["id"],
        state=str(run.get("state") or "running"),
        items_done=done,
        items_total=total,
        rate=rate or None,
        eta_s=eta,
        failed=failed,
        counts=store.counts(),
    )


def for_run(
    store: Any,
    run_dir: str,
    channels: Sequence[Channel],
    *,
    environ: Mapping[str, str] | None = None,
    wall: Callable[[], float] = time.time,
) -> Notifier:
    """The notifier of a run as the master is to build it (one call at master start).

    Records the channels for the deliverer (``notify.json``; raises
    ``ConfigError`` for an unset ``secret_env``), and when rows from before a
    restart are still pending, starts a deliverer for them.
    """
    import os

    from orchestrator.notify.deliver import launch_deliverer, write_channels
    from orchestrator.notify.outbox import Outbox

    if channels:
        write_channels(run_dir, tuple(channels), environ)
    box = Outbox(os.path.join(run_dir, "state.db"))
    try:
        pending = box.pending()
    finally:
        box.close()
    if pending:
        launch_deliverer(run_dir)
    return Notifier(
        store,
        channels,
        lambda: store_facts(store),
        wall=wall,
        launch=lambda: launch_deliverer(run_dir),
    )
