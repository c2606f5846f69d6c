"""logging.profile=true: a torch.profiler trace of the chosen steps lands in the run directory, with a top-ops table."""

from __future__ import annotations

import json

from conftest import compose
from effitrain.engine.train import run


def test_profile_writes_a_perfetto_trace_and_top_ops(tiny, tmp_path):
    cfg = compose(tiny("max_steps=4", "eval_every=100", "logging.profile=true", "logging.profile_start_step=2",
                       "logging.profile_steps=2"))
    run(cfg, tmp_path)
    traces = list((tmp_path / "profile").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]  # Chrome trace format: what Perfetto/TensorBoard read
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}  # the schedule counts from 0: our steps 2 and 3
    assert any(e.get("name") == "aten::mm" for e in events)
    top = (tmp_path / "profile" / "top_ops.txt").read_text()
    assert "Self CPU" in top and "aten::" in top
    assert "top 15 operators by self time" in (tmp_path / "train.log").read_text()


def test_profile_off_by_default_and_window_past_the_end_records_nothing(tiny, tmp_path):
    run(compose(tiny("max_steps=2", "eval_every=100")), tmp_path / "off")
    assert not (tmp_path / "off" / "profile").exists()
    run(compose(tiny("max_steps=2", "eval_every=100", "logging.profile=true", "logging.profile_start_step=5")),
        tmp_path / "late")
    assert not (tmp_path / "late" / "profile").exists()
    assert "no trace recorded" in (tmp_path / "late" / "train.log").read_text()
