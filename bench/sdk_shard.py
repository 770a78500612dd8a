"""A Python shard that reports with the SDK: ``advance()`` in a loop, forever.

Used by the hang-detection benchmark (SIGSTOP it; orch must replace it).
"""

import time

import shards

while True:
    shards.advance()
    time.sleep(0.01)
