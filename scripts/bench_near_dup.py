"""The near-duplicate filter alone (data.clean.near_dup_threshold, MinHash LSH): documents/s, MB/s and the memory
its index holds per kept document.

    python scripts/bench_near_dup.py                      # 50,000 generated documents of 60 words, threshold 0.8
    python scripts/bench_near_dup.py --documents 200000 --words 300 --threshold 0.9

The documents are generated (seeded) from a vocabulary of 50,000 made-up words, so nearly all are kept: the index
grows by one entry per document, its worst case. Memory is the growth of this process's peak RSS (getrusage) while
the documents pass through the filter, over the documents kept (the documents themselves are made before). Runs in
one process on one core (preparation runs the filter on its reader thread). Prints a table and writes
bench_near_dup.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

from _effitrain_run import report
from effitrain.data.near_dup import NearDuplicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--words", type=int, default=60, help="words per document")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--shingle-words", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_near_dup.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i:x}" for i in range(50_000)])
    docs = [" ".join(vocabulary[rng.integers(0, len(vocabulary), args.words)]) for _ in range(args.documents)]
    megabytes = sum(len(d) for d in docs) / 1e6
    index = NearDuplicates(threshold=args.threshold, num_perm=args.num_perm, shingle_words=args.shingle_words)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    removed = sum(index.match(f"generated/document_{i:07d}.txt", d) is not None for i, d in enumerate(docs))
    seconds = time.perf_counter() - start
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    kept = args.documents - removed
    result = {**{k: v for k, v in vars(args).items() if k != "out"}, "megabytes": megabytes, "seconds": seconds,
              "documents_per_s": args.documents / seconds, "mb_per_s": megabytes / seconds, "kept": kept,
              "lsh_bands": index.lsh.b, "lsh_rows": index.lsh.r, "kib_per_kept_document": grown_kib / max(kept, 1),
              "loadavg_1m": os.getloadavg()[0]}
    rows = [("documents", f"{args.documents:,} ({megabytes:.1f} MB)"), ("kept", f"{kept:,}"),
            ("LSH bands x rows", f"{index.lsh.b} x {index.lsh.r}"), ("time", f"{seconds:.1f} s"),
            ("documents/s", f"{result['documents_per_s']:,.0f}"), ("MB/s", f"{result['mb_per_s']:.2f}"),
            ("KiB per kept document", f"{result['kib_per_kept_document']:.2f}"),
            ("load (1 min)", f"{result['loadavg_1m']:.1f}")]
    report(rows, result, args.out, width=22)


if __name__ == "__main__":
    main()
