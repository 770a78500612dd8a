<?php
// A single-threaded PHP shard whose steps block for longer than the 10 s heartbeat
// timeout (a slow query). It reports on stdout between steps; orch judges it alive by
// its process, and --stall-timeout catches it if a step never ends.
//   orch run --split 2 --stall-timeout 5m -- php examples/slow_query.php {index}
$cp = getenv('ORCH_CHECKPOINT');
$page = $cp ? json_decode($cp, true)['page'] : 0;
echo '##orch ' . json_encode(['total' => 3, 'done' => $page]) . "\n";
while ($page < 3) {
    sleep(12);  // the "slow query": no output, no heartbeat, not a hang
    $page++;
    echo "shard {$argv[1]}: page $page\n";
    echo '##orch ' . json_encode(['done' => $page, 'checkpoint' => ['page' => $page]]) . "\n";
}
