"""Start-up stays light: `effitrain --help` imports no torch, and a run reports its command-to-first-step time.

Loose bounds only: timings belong in scripts/ benchmarks (BENCHMARKS.md), not in tests.
"""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import compose
from effitrain.train import run


def test_help_is_fast_and_imports_no_torch():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "effitrain.cli", "--help"], capture_output=True, text=True, timeout=30)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0 and "experiment" in out.stdout
    assert elapsed < 3.0, f"effitrain --help took {elapsed:.2f} s"  # ~0.4 s on an idle laptop core
    probe = "import sys, effitrain.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_startup_is_logged_and_summarised(tiny, tmp_path):
    summary = run(compose(tiny("max_steps=1")), tmp_path)
    assert 0 < summary["startup_s"] < 600
    assert "startup:" in (tmp_path / "train.log").read_text()
