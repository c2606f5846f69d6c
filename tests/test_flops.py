"""Measured peak FLOP/s: probed once per key (host, torch, dtype, threads), cached, reused and only ever raised."""

from __future__ import annotations

import json

import pytest
import torch

from effitrain.base import flops

CPU = torch.device("cpu")


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """A tmp cache and a fake probe: set `probes.readings` to what the next probes read; `probes.budgets` records
    each probe's time budget."""
    monkeypatch.setenv(flops.PEAK_CACHE_ENV, str(tmp_path / "peak.json"))

    class Probes:
        readings: list[float] = []
        budgets: list[float] = []
        path = tmp_path / "peak.json"

    def fake(device, autocast_dtype, *, budget_s):
        Probes.budgets.append(budget_s)
        return Probes.readings.pop(0)

    monkeypatch.setattr(flops, "measure_peak", fake)
    return Probes


def test_second_run_reuses_the_cached_peak_and_only_a_higher_probe_raises_it(probes):
    probes.readings = [1.0e11, 0.4e11, 1.3e11]
    peak, source = flops.peak_flops(CPU, dtype="float32", autocast_dtype=None)
    assert peak == 1.0e11 and source.startswith("measured (new max, cached ")
    assert probes.budgets == [flops.FIRST_PROBE_S]  # the first probe of a key is the long one

    peak, source = flops.peak_flops(CPU, dtype="float32", autocast_dtype=None)  # a busy machine reads low
    assert peak == 1.0e11 and source.startswith("measured (cached ") and probes.budgets[-1] == flops.PROBE_S

    peak, source = flops.peak_flops(CPU, dtype="float32", autocast_dtype=None)  # a quieter one raises it
    assert peak == 1.3e11 and source.startswith("measured (new max")
    (entry,) = json.loads(probes.path.read_text())["entries"].values()
    assert entry["peak_flops"] == 1.3e11 and entry["probes"] == 3 and entry["last_reading"] == 1.3e11


def test_the_cache_key_holds_thread_count_and_dtype(probes, monkeypatch):
    probes.readings = [1.0e11, 2.0e11, 0.5e11]
    threads = torch.get_num_threads()
    flops.peak_flops(CPU, dtype="float32", autocast_dtype=None)
    flops.peak_flops(CPU, dtype="bfloat16", autocast_dtype=torch.bfloat16)  # another dtype: its own long probe
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    peak, _ = flops.peak_flops(CPU, dtype="float32", autocast_dtype=None)  # fewer threads: not the 2-thread value
    assert peak == 0.5e11 and probes.budgets == [flops.FIRST_PROBE_S] * 3
    keys = [e["key"] for e in json.loads(probes.path.read_text())["entries"].values()]
    assert {(k["dtype"], k["autocast"], k["threads"]) for k in keys} == {
        ("float32", "none", threads), ("bfloat16", "bfloat16", threads), ("float32", "none", 1)}
    assert all(k["torch"] == torch.__version__ and k["host"] for k in keys)


def test_an_unwritable_cache_still_gives_this_runs_probe(probes, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(flops.PEAK_CACHE_ENV, str(tmp_path / "file" / "peak.json"))  # parent is a file
    probes.readings = [1.0e11]
    assert flops.peak_flops(CPU, dtype="float32", autocast_dtype=None) == (1.0e11, "measured (not cached)")


def test_the_real_probe_measures_something():
    assert flops.measure_peak(CPU, None, budget_s=0.05) > 1e9


def test_fp8_has_no_peak_and_known_gpus_use_the_table():
    assert flops.peak_flops(CPU, dtype="float8", autocast_dtype=torch.bfloat16) == (None, "undefined")
    assert flops.table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert flops.table_peak("NVIDIA L40S", "bfloat16") is None  # whole words: L4 is not L40S
