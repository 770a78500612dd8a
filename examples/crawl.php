<?php
// A PHP shard reporting to orch with one echo per update (the stdout protocol).
//   orch run --shards merchants.csv -- php crawl.php {merchant_id} {pages}
$merchant = $argv[1];
$pages = (int)$argv[2];
$cp = getenv('ORCH_CHECKPOINT');
$start = $cp ? json_decode($cp, true)['page'] : 0;
for ($page = $start + 1; $page <= $pages; $page++) {
    usleep(50000); // the "HTTP request"
    echo "$merchant: page $page\n";
    echo '##orch ' . json_encode(['done' => $page, 'total' => $pages]) . "\n";
    if ($page % 10 == 0) {
        echo '##orch ' . json_encode(['checkpoint' => ['page' => $page]]) . "\n";
    }
}
