"""Schedule group: each schedule's lr against its closed form, warmup_ratio, and resuming gives the same lr."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from effitrain.checks import check_all
from effitrain.compose import group_options
from effitrain.errors import UsageError
from effitrain.schedule.build import build_scheduler

LR, STEPS, WARMUP, MIN = 1e-3, 100, 10, 0.1


def closed_form(kind: str, s: int) -> float:
    """lr factor at scheduler step s (0-based: the lr of optimizer step s + 1), written out by hand."""
    if kind == "constant":
        return min(1.0, s / WARMUP)
    if kind == "cosine":
        return s / WARMUP if s < WARMUP else MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / 90))
    if kind == "linear":  # transformers' WSD shape: warmup starts from MIN
        return MIN + (1 - MIN) * (s / WARMUP if s < WARMUP else 1 - (s - WARMUP) / 90)
    if kind == "wsd":  # decay over the last 20% of the 90 post-warmup steps (18), 1-sqrt shaped
        if s < WARMUP:
            return MIN + (1 - MIN) * s / WARMUP
        return 1.0 if s < 82 else MIN + (1 - MIN) * (1 - math.sqrt((s - 82) / 18))
    if kind == "inverse-sqrt":
        return s / WARMUP if s < WARMUP else max(MIN, math.sqrt(WARMUP / s))
    raise AssertionError(kind)


def _scheduler(kind: str, *extra: str, max_steps: int = STEPS):
    floor = [] if kind == "constant" else [f"schedule.min_lr_ratio={MIN}"]  # constant has no floor to set
    cfg = compose([f"schedule={kind}", f"schedule.warmup_steps={WARMUP}", *floor, *extra])
    check_all(cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return build_scheduler(optimizer, cfg=cfg.schedule, max_steps=max_steps), optimizer


def _lrs(scheduler, optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_every_option_is_covered_here():
    assert set(group_options("schedule")) == {"constant", "cosine", "linear", "wsd", "inverse-sqrt"}


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd", "inverse-sqrt"])
def test_lr_matches_the_closed_form(kind):
    lrs = _lrs(*_scheduler(kind, *(["schedule.decay_shape=1-sqrt"] if kind == "wsd" else [])), STEPS)
    for s in (0, 1, 5, 9, 10, 11, 40, 81, 82, 90, 99):
        assert lrs[s] == pytest.approx(LR * closed_form(kind, s), rel=1e-9, abs=1e-15), s
    assert min(lrs[WARMUP:]) >= LR * MIN * (1 - 1e-9)  # the floor holds after warmup


def test_a_key_the_schedule_does_not_read_is_unknown():
    with pytest.raises(UsageError, match="unknown key 'schedule.decay_ratio'"):
        compose(["schedule=cosine", "schedule.decay_ratio=0.3"])
    with pytest.raises(UsageError, match="unknown key 'schedule.min_lr_ratio'"):
        compose(["schedule=constant", "schedule.min_lr_ratio=0.1"])


def test_warmup_ratio_overrides_warmup_steps():
    lrs = _lrs(*_scheduler("cosine", "schedule.warmup_ratio=0.2"), 30)
    assert lrs[10] == pytest.approx(LR * 10 / 20) and lrs[20] == pytest.approx(LR)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd", "inverse-sqrt"])
def test_resuming_from_a_step_gives_the_same_lr(kind):
    scheduler, optimizer = _scheduler(kind)
    _lrs(scheduler, optimizer, 37)
    saved = scheduler.state_dict()
    expected = _lrs(scheduler, optimizer, 63)
    resumed, resumed_optimizer = _scheduler(kind)
    resumed.load_state_dict(saved)
    resumed_optimizer.param_groups[0]["lr"] = resumed.get_last_lr()[0]  # an optimizer checkpoint restores this
    assert _lrs(resumed, resumed_optimizer, 63) == expected


def test_trainer_counts_optimizer_steps_not_micro_steps(tiny, tmp_path):
    from conftest import read_metrics
    from effitrain.engine.train import run

    run(compose(tiny("grad_accum_steps=2", "max_steps=4", "schedule=constant", "schedule.warmup_steps=4")), tmp_path)
    lr = compose([]).optimizer.lr
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx([0, lr / 4, lr / 2, 3 * lr / 4])


@pytest.mark.parametrize("bad, message", [
    (["schedule.kind=step"], "schedule.kind='step' is not one of"),
    (["schedule.warmup_ratio=1.5"], "warmup_ratio=1.5 must lie in"),
    (["schedule=wsd", "schedule.decay_shape=exp"], "decay_shape='exp'"),
])
def test_bad_settings_are_one_line_errors(bad, message):
    with pytest.raises(UsageError, match=message):
        check_all(compose(bad))
