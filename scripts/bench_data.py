"""Data preparation at scale: wall time, MB/s and peak RSS of a cold build, and the data work of a cached run.

    python scripts/bench_data.py --paths /path/to/site-packages            # a real ~190 MB .py/.md/.txt corpus
    python scripts/bench_data.py --generate-gb 2                           # a generated 2 GB corpus
    python scripts/bench_data.py --paths DIR --src /path/to/other/src      # the same against another tree's code

Each measurement is a fresh subprocess (`prepare_data` of `data=text data.paths=[...]` into a fresh cache
directory, then again from that cache), which reports its own peak RSS and CPU time (getrusage) and the seconds
spent in prepare_data (the CPU time, unlike the wall time, barely moves when other work shares the machine). The
generated corpus is copies of this interpreter's stdlib .py files, each copy under its own directory with its
index in every file's first line (distinct documents, real code text). The 10 GB figure is extrapolated from the
measured cold rate (it assumes the rate holds, as a bounded-memory pass should).
Prints a table and writes bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from _effitrain_run import report

_CHILD = r"""
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from effitrain.compose import compose_one
from effitrain.data.prepare import prepare_data
cfg = compose_one(sys.argv[1:]).data
t = time.perf_counter()
data = prepare_data(cfg)
seconds = time.perf_counter() - t
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "cpu_s": use.ru_utime + use.ru_stime, "peak_rss_mb": use.ru_maxrss / 1024,
                  "train_tokens": int(len(data.tokens.train)), "val_tokens": int(len(data.tokens.val))}))
"""


def measure(paths: list[Path], cache: Path, src: Path, extra: list[str]) -> dict:
    overrides = ["data=text", f"data.paths=[{','.join(str(p) for p in paths)}]", f"data.cache_dir={cache}", *extra]
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-c", _CHILD, *overrides], env=env, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def corpus_bytes(paths: list[Path]) -> int:
    suffixes = {".txt", ".md", ".rst", ".py"}
    return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)


def generate(root: Path, gigabytes: float) -> Path:
    """Copies of the stdlib's .py files until `gigabytes` GB (reused if already there with that size)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    texts = [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]
    target, written, copy = int(gigabytes * 1e9), 0, 0
    out = root / f"generated-{gigabytes:g}gb"
    if out.is_dir() and abs(corpus_bytes([out]) - target) < 2e7:
        return out
    shutil.rmtree(out, ignore_errors=True)
    while written < target:
        d = out / f"copy{copy:05d}"
        d.mkdir(parents=True)
        for name, text in texts:
            payload = f"# copy {copy}\n{text}"
            (d / name).write_text(payload)
            written += len(payload.encode())
            if written >= target:
                break
        copy += 1
    return out


def profile(cache: Path, paths: list[Path], megabytes: float) -> dict:
    """Where a pass's time goes: the first `megabytes` of the corpus through the cold build's tokenizer, timed as
    the pipeline's BulkEncoder (tiktoken for this BPE), tokenizers' encode_batch_fast and encode_batch (what the
    code before streaming called), and the Python side of tokenizers' output (ids to a uint16 array)."""
    import time

    import numpy as np
    from tokenizers import Tokenizer

    from effitrain.data.encode import BulkEncoder

    tok = Tokenizer.from_file(str(next(cache.glob("*/tokenizer.json"))))
    texts, size = [], 0
    for f in sorted(f for p in paths for f in p.rglob("*") if f.is_file() and f.suffix in {".txt", ".md", ".py"}):
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size >= megabytes * 1e6:
            break
    t0 = time.perf_counter()
    with BulkEncoder(tok) as encoder:
        encoder.encode(texts)
    t1 = time.perf_counter()
    encodings = tok.encode_batch_fast(texts)
    t2 = time.perf_counter()
    ids: list[int] = []
    for enc in encodings:
        ids += enc.ids
    np.asarray(ids, dtype=np.uint16)
    t3 = time.perf_counter()
    tok.encode_batch(texts)
    t4 = time.perf_counter()
    return {"profile_mb": size / 1e6, "bulk_encoder": "tiktoken" if encoder.tiktoken else "tokenizers",
            "bulk_encoder_s": t1 - t0, "encode_batch_fast_s": t2 - t1, "python_side_s": t3 - t2,
            "encode_batch_s": t4 - t3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="*", type=Path, default=[], help="corpus files or directories")
    parser.add_argument("--generate-gb", type=float, default=None, help="generate a corpus of this many GB")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "effitrain-bench-data")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the effitrain source tree to measure (default: this checkout's)")
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    parser.add_argument("--profile-mb", type=float, default=0, help="also time the tokenizer on this many MB")
    parser.add_argument("overrides", nargs="*", help="extra data overrides, e.g. data.tokenizer_sample_mb=16")
    args = parser.parse_args()
    paths = list(args.paths)
    if args.generate_gb:
        paths.append(generate(args.work, args.generate_gb))
    if not paths:
        parser.error("give --paths and/or --generate-gb")
    size = corpus_bytes(paths)
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold = measure(paths, cache, args.src, args.overrides)
    cached = measure(paths, cache, args.src, args.overrides)
    probe = profile(cache, paths, args.profile_mb) if args.profile_mb else {}
    shutil.rmtree(cache, ignore_errors=True)
    rate = size / cold["seconds"]
    result = {"corpus_mb": size / 1e6, "paths": [str(p) for p in paths], "src": str(args.src),
              "overrides": args.overrides, "cold_s": cold["seconds"], "cold_cpu_s": cold["cpu_s"],
              "cold_mb_per_s": rate / 1e6,
              "cold_peak_rss_mb": cold["peak_rss_mb"], "cached_data_s": cached["seconds"],
              "cached_peak_rss_mb": cached["peak_rss_mb"], "train_tokens": cold["train_tokens"],
              "val_tokens": cold["val_tokens"], "extrapolated_10gb_s": 10e9 / rate, "cpus": os.cpu_count(),
              "loadavg_1m": os.getloadavg()[0], **probe}
    rows = [("corpus", f"{size / 1e6:,.0f} MB"), ("cold preparation", f"{cold['seconds']:.1f} s"),
            ("cold CPU time", f"{cold['cpu_s']:.1f} s"), ("cold rate", f"{rate / 1e6:.2f} MB/s"),
            ("cold peak RSS", f"{cold['peak_rss_mb']:,.0f} MB"),
            ("cached run, data work", f"{cached['seconds']:.2f} s"),
            ("cached run, peak RSS", f"{cached['peak_rss_mb']:,.0f} MB"),
            ("tokens (train + val)", f"{cold['train_tokens'] + cold['val_tokens']:,}"),
            ("10 GB at the cold rate", f"{10e9 / rate / 60:.0f} min")]
    if probe:
        rows += [(f"{probe['profile_mb']:.1f} MB: BulkEncoder ({probe['bulk_encoder']})",
                  f"{probe['bulk_encoder_s']:.2f} s"),
                 ("  encode_batch_fast", f"{probe['encode_batch_fast_s']:.2f} s"),
                 ("  python side", f"{probe['python_side_s']:.2f} s"),
                 ("  encode_batch (before)", f"{probe['encode_batch_s']:.2f} s")]
    report(rows, result, args.out, width=16)


if __name__ == "__main__":
    main()
