"""What people see: ``orch status``, ``orch logs``, the live view of ``orch run``, the summary.

``figures`` computes rate, ETA and counts by state for all of them;
``report`` builds the status records (the ``--json`` schema) from a run's
database; ``table`` lays out plain text tables fast.
"""
