"""Helpers shared by the test suites (on the path through pytest's ``pythonpath``).

- ``world``: one test's world (a cwd and a home), running ``orch``, polling with a deadline.
- ``control``: live runs steered over the control socket; process checks by environment.
- ``progress``: runs read through their database; shard scripts that wait for the test.
- ``reliability``: faults, /proc sampling, signalling only this test's processes by pidfd.
"""
