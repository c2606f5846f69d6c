"""Named presets (configs/experiment/*.yaml, `# @package _global_`): +experiment=NAME and experiment=NAME both work."""

from __future__ import annotations

import pytest

from effitrain.checks import check_all
from effitrain.cli import main
from effitrain.compose import compose_all, group_options, normalize


@pytest.mark.parametrize("name", group_options("experiment"))
def test_every_preset_composes_and_passes_checks(name):
    cfg = next(compose_all([f"+experiment={name}"]))
    check_all(cfg)
    assert cfg.parallel.compile and cfg.optimizer.implementation == "fused"


def test_both_forms_select_a_preset():
    assert normalize(["experiment=fast-cpu", "+experiment=fast-cpu", "+precision=bf16"]) == [
        "+experiment=fast-cpu", "+experiment=fast-cpu", "precision=bf16"]


def test_unknown_preset_is_one_line_exit_2(capsys):
    assert main(["train", "+experiment=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "effitrain: error: unknown experiment option 'nope'; choose one of: fast-cpu, fast-gpu"
