"""Notifications: [notify.NAME] channels, the outbox in the run's store, delivery.

* ``config``   parses ``[notify.NAME]`` tables and the tasks' ``notify = [...]``.
* ``notifier`` the master-facing seam: turns shard/run state changes and timer
  ticks into outbox rows staged on the master's store, and never blocks.
* ``payload``  what each kind (webhook, slack, dingtalk) posts, and signing.
* ``send``     one HTTP POST and the judgement of the receiver's answer.
* ``outbox``   claiming and marking outbox rows from a second process.
* ``deliver``  the deliverer process (``python -m orchestrator.notify.deliver RUN_DIR``).

docs/notify.md describes the behaviour and the decisions taken.
"""
