"""The stability verdict (`stability.verdict.judge`) on hand-made step records.

A check reads every step, not only the last: a ratio or KL that left its band and came back fails, a NaN at any
step fails each check that reads it, the last validation accuracy is the one judged, and the bounds are inclusive.
"""

import math

import pytest

from openrlhf_gmpo.stability.config import VerdictConfig
from openrlhf_gmpo.stability.verdict import judge

THRESHOLDS = VerdictConfig(max_token_ratio=2.0, max_kl=0.1, val_accuracy_tolerance=0.05)


def _record(step, **overrides):
    record = {"algo": "gmpo", "step": step, "token_ratio_min": 0.9, "token_ratio_max": 1.1, "kl_ref": 0.01}
    record.update(overrides)
    return record


def test_verdict_passes_a_healthy_run():
    records = [_record(1), _record(2, val_accuracy=0.30)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    # 0.30 >= 0.32 - 0.05 = 0.27
    assert verdict["passed"] and verdict["steps"] == 2
    assert verdict["checks"]["val_accuracy"]["allowed_min"] == pytest.approx(0.27)
    assert verdict["checks"]["token_ratio_range"]["allowed"] == [0.5, 2.0]


def test_verdict_fails_on_an_injected_nan():
    records = [_record(1), _record(2, grad_norm=math.nan, val_accuracy=0.32)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    assert not verdict["passed"]
    assert not verdict["checks"]["finite"]["passed"]
    assert verdict["checks"]["finite"]["non_finite"] == [{"step": 2, "key": "grad_norm"}]
    # the other checks do not read grad_norm and still pass: the verdict says exactly what failed
    assert verdict["checks"]["kl_ref"]["passed"]


def test_verdict_fails_on_a_nan_ratio_through_every_check_that_reads_it():
    records = [_record(1, token_ratio_max=math.nan, val_accuracy=0.32)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    assert not verdict["checks"]["finite"]["passed"]
    assert not verdict["checks"]["token_ratio_range"]["passed"]


@pytest.mark.parametrize(("low", "high"), [(0.9, 2.5), (0.4, 1.1)])
def test_verdict_fails_on_an_over_range_ratio(low, high):
    # allowed [1/2, 2]: 2.5 is above it, 0.4 below it
    records = [_record(1), _record(2, token_ratio_min=low, token_ratio_max=high, val_accuracy=0.32)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    assert not verdict["passed"]
    check = verdict["checks"]["token_ratio_range"]
    assert not check["passed"] and check["min"] == low and check["max"] == high


def test_verdict_fails_on_kl_and_on_an_accuracy_drop():
    records = [_record(1, kl_ref=0.2), _record(2, val_accuracy=0.20)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    assert not verdict["checks"]["kl_ref"]["passed"] and verdict["checks"]["kl_ref"]["max"] == 0.2
    # 0.20 < 0.27
    assert not verdict["checks"]["val_accuracy"]["passed"]


def test_verdict_of_no_steps_fails():
    assert judge([], start_val_accuracy=0.32, thresholds=THRESHOLDS)["passed"] is False


def test_verdict_sees_a_ratio_that_left_the_band_early():
    # step 1 dips to 0.4 < 1/2, step 2 is back inside: the run still fails
    records = [_record(1, token_ratio_min=0.4), _record(2, val_accuracy=0.32)]
    check = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)["checks"]["token_ratio_range"]
    assert not check["passed"] and check["min"] == 0.4


def test_verdict_sees_a_nan_after_finite_values():
    # max([1.1, nan]) is 1.1 in Python: a NaN after the first step must still fail the checks that read it
    records = [_record(1), _record(2, token_ratio_max=math.nan, kl_ref=math.nan, val_accuracy=0.32)]
    checks = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)["checks"]
    assert not checks["token_ratio_range"]["passed"] and not checks["kl_ref"]["passed"]


def test_verdict_judges_the_last_validation():
    # accuracy 0.32 at step 1, collapsed to 0.10 at step 2, not evaluated at step 3: 0.10 < 0.27 fails
    records = [_record(1, val_accuracy=0.32), _record(2, val_accuracy=0.10), _record(3)]
    check = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)["checks"]["val_accuracy"]
    assert not check["passed"] and check["final"] == 0.10 and check["final_step"] == 2


def test_verdict_without_any_validation_fails_that_check():
    check = judge([_record(1)], start_val_accuracy=0.32, thresholds=THRESHOLDS)["checks"]["val_accuracy"]
    assert not check["passed"] and math.isnan(check["final"])


def test_verdict_bounds_are_inclusive():
    # exactly at every bound (all exact in binary): ratios 1/2 and 2, KL 0.25, accuracy 0.25 = 0.5 - 0.25
    thresholds = VerdictConfig(max_token_ratio=2.0, max_kl=0.25, val_accuracy_tolerance=0.25)
    record = _record(1, token_ratio_min=0.5, token_ratio_max=2.0, kl_ref=0.25, val_accuracy=0.25)
    verdict = judge([record], start_val_accuracy=0.5, thresholds=thresholds)
    assert verdict["passed"], verdict["checks"]


def test_verdict_counts_steps_and_lists_the_first_ten_non_finite_values():
    # 11 records at steps 5, 10, ..., 55, each with a NaN grad norm: steps is the last step, not the record count
    records = [_record(5 * (i + 1), grad_norm=math.nan) for i in range(11)]
    verdict = judge(records, start_val_accuracy=0.32, thresholds=THRESHOLDS)
    assert verdict["steps"] == 55
    finite = verdict["checks"]["finite"]
    assert finite["count"] == 11 and len(finite["non_finite"]) == 10 and finite["non_finite"][0]["step"] == 5
