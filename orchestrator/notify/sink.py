"""The notifier as one of the master's event sinks (``assemble.build_master(sinks=...)``).

``NotifySink`` adapts the run's event stream to the ``Notifier`` seam:

* a shard change (``publish``, called when the change is staged, before the
  group commit that records it) becomes ``on_shard_state``: its outbox rows
  are staged on the master's store and go out in that same commit;
* the run's end (``ending``, called before the commit that records the run's
  final state) becomes ``on_run_state``; the run-end ``publish`` that follows
  the commit is ignored;
* ``committed`` (after every commit) is ``after_commit``: a deliverer is
  started when rows were added (a lock probe and at most one ``Popen``);
* ``tick`` is the notifier's digest timer, run on the master's loop.

None of it does network I/O or waits.
"""

from __future__ import annotations

from typing import Any

from orchestrator.notify.notifier import Notifier, for_run

__all__ = ["NotifySink"]


class NotifySink:
    """A ``RecordingSink`` (orchestrator.ports) that feeds a ``Notifier``."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    @classmethod
    def for_run(cls, store: Any, run_dir: str) -> NotifySink:
        """The sink of a run whose channels ``orch run`` recorded in its notify.json."""
        from orchestrator.notify.deliver import read_channels

        channels = tuple(read_channels(run_dir).values())
        return cls(for_run(store, run_dir, channels))

    def publish(self, event: dict[str, Any]) -> None:
        shard = event.get("shard")
        if shard is None:
            return  # the run's end: already handled by ending()
        self.notifier.on_shard_state(
            str(shard),
            str(event.get("state")),
            reason=event.get("reason"),
            intent=event.get("intent"),
        )

    def ending(self, event: dict[str, Any]) -> None:
        self.notifier.on_run_state(str(event.get("run")))

    def committed(self) -> None:
        self.notifier.after_commit()

    def tick(self, now: float) -> float | None:
        return self.notifier.tick(now)

    def close(self) -> None:
        pass
