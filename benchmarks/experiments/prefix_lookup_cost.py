"""What a prefix-cache lookup costs the scheduler as the cache fills with short prompts (experiment, not part
of CI; plain Python, no model).

Every finished request leaves an entry; a prompt shorter than the cache interval (256 tokens) leaves a tail
under the root, so the root ends up with one tail per short prompt served. Before session 17 a lookup scanned
all of them (twice: the tails, then every child and tail for the branch point), and bench_engine.py's step
admitting 64 prompts of 8 tokens spent 26 ms in lookups on an H200's host. This fills a cache with N entries
of random 8-token prompts and times the lookup of a new one.

    python benchmarks/experiments/prefix_lookup_cost.py [--entries 500,2000,8000]
"""

from __future__ import annotations

import argparse
import random
import time

from kda_serving.cache import KVBlockManager, PrefixCache, StateSlotPool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", default="500,2000,8000")
    args = ap.parse_args()
    rng = random.Random(0)
    for n in (int(x) for x in args.entries.split(",")):
        slots, blocks = StateSlotPool(n + 1), KVBlockManager(n + 8, 16)
        cache = PrefixCache(256, slots, blocks)
        for _ in range(n):
            table = blocks.allocate(1)
            cache.insert([rng.randrange(163840) for _ in range(8)], 8, table, slots.allocate())
            blocks.decref(table)
        queries = [[rng.randrange(163840) for _ in range(8)] for _ in range(200)]
        t0 = time.perf_counter()
        for q in queries:
            cache.lookup(q, 7)
        print(f"{n:5d} entries: {1e6 * (time.perf_counter() - t0) / len(queries):7.1f} us per lookup")


if __name__ == "__main__":
    main()
