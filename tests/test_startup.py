"""Start-up stays light: `effitrain --help` imports no torch, and a run reports its command-to-first-step time.

No timings asserted: they belong in scripts/ benchmarks (BENCHMARKS.md), not in tests.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import compose
from effitrain.engine.train import run


def test_help_imports_no_torch():
    """What keeps `effitrain --help` fast: it never loads torch (its time is a benchmark's business, not a test's)."""
    out = subprocess.run([sys.executable, "-m", "effitrain.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "experiment" in out.stdout
    probe = "import sys, effitrain.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_startup_is_logged_and_summarised(tiny, tmp_path, monkeypatch):
    import time

    from effitrain.runs import LAUNCH_TIME_ENV

    # the command starts now (the CLI marks it so; without a mark a run counts from its process's start, and this
    # pytest worker -- or an earlier in-process cli.main of another test -- may have started long ago)
    monkeypatch.setenv(LAUNCH_TIME_ENV, repr(time.time()))
    summary = run(compose(tiny("max_steps=1")), tmp_path)
    assert 0 < summary["startup_s"] < 600
    assert "startup:" in (tmp_path / "train.log").read_text()
