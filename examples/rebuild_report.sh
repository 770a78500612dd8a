#!/bin/sh
# A shell shard using the stdout protocol: one echo per update.
# Usage: rebuild_report.sh --split=N --part=I
part=${2#--part=}
total=20
done_=0
if [ -n "$ORCH_CHECKPOINT" ]; then done_=$(printf '%s' "$ORCH_CHECKPOINT" | tr -cd '0-9'); fi
while [ "$done_" -lt "$total" ]; do
  done_=$((done_ + 1))
  sleep 0.1
  echo "##orch {\"done\": $done_, \"total\": $total}"
  if [ $((done_ % 5)) -eq 0 ]; then echo "##orch {\"checkpoint\": $done_}"; fi
done
echo "part $part rebuilt"
