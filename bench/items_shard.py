"""A shard that works through N items: ``python bench/items_shard.py N [--bare]``.

The work per item is a small integer hash step; under orch each item also
calls ``shards.advance()`` (``--bare``: no SDK at all). Prints the loop's
seconds as ``loop_s=...`` (for bench/m_items.py).
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> None:
    n = int(argv[0])
    bare = "--bare" in argv
    acc = 0
    if bare:
        t0 = time.perf_counter()
        for i in range(n):
            acc = (acc * 31 + i) & 0xFFFFFFFF
    else:
        import shards

        shards.progress(0, n)
        advance = shards.advance
        t0 = time.perf_counter()
        for i in range(n):
            acc = (acc * 31 + i) & 0xFFFFFFFF
            advance()
    took = time.perf_counter() - t0
    print(f"acc={acc} loop_s={took:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
