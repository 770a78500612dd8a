"""A crawler-like shard: fetches a merchant's pages, reports progress, checkpoints.

Run by orch once per merchant (see orch.toml). By hand it runs too:
    python crawl.py --merchant acme --pages 10
"""

import argparse
import random
import time

import shards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchant", required=True)
    parser.add_argument("--pages", type=int, default=30)
    args = parser.parse_args()

    info = shards.info()
    start = (shards.last_checkpoint() or {}).get("page", 0)
    if start:
        print(f"{args.merchant}: resuming at page {start + 1} (attempt {info.attempt})")
    shards.progress(start, total=args.pages)
    for page in range(start + 1, args.pages + 1):
        time.sleep(random.uniform(0.02, 0.08))  # the "HTTP request"
        print(f"{args.merchant}: page {page}/{args.pages}: {random.randint(5, 50)} products")
        shards.advance()
        if page % 10 == 0:
            shards.checkpoint({"page": page})
        # One merchant's first attempt dies half-way, to show restart + resume.
        if args.merchant == "initech" and info.attempt == 1 and page == 33:
            raise SystemExit("initech: connection reset by peer")
    print(f"{args.merchant}: done")


if __name__ == "__main__":
    main()
