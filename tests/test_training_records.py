"""The CPR weight schedule and calibration, and the validation record, on their own."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cpl_fast.config import as_settings, load_config
from cpl_fast.train.cpr_weight import CprWeight
from cpl_fast.train.validations import Validations, validation_values


def _weight(*overrides: str) -> CprWeight:
    return CprWeight(as_settings(load_config("demo", overrides=list(overrides))))


def test_warmup_then_linear_ramp_to_alpha():
    weight = _weight("cpr.recipe=paper", "cpr.alpha=0.5", "cpr.warmup_steps=2", "cpr.ramp_steps=4")
    assert [weight.alpha(step) for step in range(8)] == [0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert weight.in_warmup(1) and not weight.in_warmup(2)
    assert not weight.needs_calibration()  # the paper's recipe: a fixed alpha


def test_relative_alpha_and_logistic_tau_are_measured_once():
    weight = _weight("cpr.alpha_relative=0.2", "cpr.form=logistic", "cpr.tau=null")
    assert weight.needs_calibration()
    loss = SimpleNamespace(alpha=None, tau=None)
    calls = []

    def measure():
        calls.append(1)
        return 0.3, 1.5

    lines = []
    assert weight.prepare(loss, 0, measure, lines.append) is False
    assert weight.calibration == {"alpha": pytest.approx(0.2 * 0.3 / 1.5), "tau": 1.5}
    assert (loss.alpha, loss.tau) == (weight.calibration["alpha"], 1.5)
    assert lines and lines[0].startswith("CPR calibrated on the first batch")
    weight.prepare(loss, 1, measure, lines.append)
    assert len(calls) == 1 and not weight.needs_calibration()
    resumed = _weight("cpr.alpha_relative=0.2", "cpr.form=logistic", "cpr.tau=null")
    resumed.load_state_dict(weight.state_dict())
    assert not resumed.needs_calibration() and resumed.alpha(5) == weight.alpha(5)


@pytest.mark.parametrize("l_pos", [0.0, -1.0, math.inf, math.nan])
def test_calibration_refuses_a_useless_l_pos(l_pos):
    with pytest.raises(FloatingPointError, match="cannot calibrate CPR"):
        _weight("cpr.alpha_relative=0.1").calibrate(0.1, l_pos)


def test_an_l1_run_never_calibrates():
    assert not _weight("objective=l1", "cpr.alpha_relative=0.1").needs_calibration()


def _scores(psnr_a, psnr_b):
    level = {"selection_entropy": 1.0}
    return {"a": {"psnr": psnr_a, "ssim": 0.5, "levels": [level]},
            "b": {"psnr": psnr_b, "ssim": 0.7, "levels": [{"selection_entropy": 0.0}]}}


def test_validation_values_are_the_task_average_and_per_task_psnr():
    values = validation_values(_scores(20.0, 30.0))
    assert values == {"psnr": 25.0, "ssim": pytest.approx(0.6), "psnr_a": 20.0, "psnr_b": 30.0,
                      "selection_entropy_l0": 0.5}


def test_the_best_is_tracked_only_when_kept():
    records = Validations()
    assert records.add(10, validation_values(_scores(20.0, 30.0)), keep_best=True)
    assert not records.add(20, validation_values(_scores(19.0, 30.0)), keep_best=True)
    assert records.add(30, validation_values(_scores(21.0, 30.0)), keep_best=True)
    assert records.best["step"] == 30 and [r["step"] for r in records.records] == [10, 20, 30]
    untracked = Validations()
    assert not untracked.add(10, validation_values(_scores(20.0, 30.0)), keep_best=False)
    assert untracked.best is None
    copy = Validations()
    copy.load_state_dict(records.state_dict())
    assert copy.records == records.records and copy.best == records.best
