"""Hand-computed checks of the stability loop's pure functions and of the verdict."""

import math

import pytest
import torch

from openrlhf_gmpo.stability.config import VerdictConfig
from openrlhf_gmpo.stability.rl_math import group_advantages, k3_kl, masked_mean, router_load_stats
from openrlhf_gmpo.stability.state import derive_seed
from openrlhf_gmpo.stability.verdict import judge


def test_group_advantages_hand_computed():
    # group 1: rewards [1, 0, 0, 0.1]: mean 0.275; deviations [0.725, -0.275, -0.275, -0.175];
    #   unbiased variance (0.525625 + 0.075625 + 0.075625 + 0.030625) / 3 = 0.2358333; std 0.4856267
    # group 2: all rewards equal -> (r - mean) = 0 -> all advantages 0 (no signal, no division blow-up)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    adv = group_advantages(rewards, group_size=4, eps=1e-6)
    std = 0.4856267
    expected = torch.tensor([0.725 / std, -0.275 / std, -0.275 / std, -0.175 / std, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)


def test_group_advantages_two_samples():
    # rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> [+0.7071, -0.7071]
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.70710678, -0.70710678]))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="cannot be split into groups of 4"):
        group_advantages(torch.zeros(6), group_size=4, eps=1e-6)


def test_k3_and_masked_mean():
    # ref - logp = [0, ln 2, -ln 2]; k3 = e^x - x - 1 = [0, 2 - ln2 - 1, 0.5 + ln2 - 1] = [0, 0.30685, 0.19315]
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = logp + torch.tensor([[0.0, math.log(2), -math.log(2)]])
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.30685282, 0.19314718]]))
    # the mask keeps the first two tokens: (0 + 0.30685) / 2
    mean = masked_mean(kl, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(mean, torch.tensor(0.15342641))


def test_router_load_stats_hand_computed():
    # one layer, 2 experts, 3 tokens of which the last is padding (mask 0).
    # token 0 logits [0, 0] -> probs [0.5, 0.5], entropy ln2 -> normalised 1.0; topk picks expert 0 (first index on tie)
    # token 1 logits [10, -10] -> top-1 expert 0, entropy ~ 0 (p = 1 - 2e-9)
    # padding token votes for expert 1 but is masked out, so expert 0 gets 2 of 2 assignments -> max share 1.0
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [-10.0, 10.0]])
    stats = router_load_stats((logits,), torch.tensor([[1, 1, 0]]), top_k=1)
    assert stats["expert_max_share"] == pytest.approx(1.0)
    assert stats["router_entropy"] == pytest.approx(0.5, abs=1e-6)  # mean of 1.0 and ~0.0


def test_derive_seed_is_stable_and_distinct():
    # sha256-based, so the same in every process (str hash() would not be)
    assert derive_seed(1, "sample", "gmpo", 3) == derive_seed(1, "sample", "gmpo", 3)
    assert derive_seed(1, "sample", "gmpo", 3) != derive_seed(1, "sample", "grpo", 3)


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


def test_metrics_records_read_back_with_non_finite_values_and_a_cut_last_line(tmp_path):
    from openrlhf_gmpo.stability.report import json_line, read_records

    records = [{"algo": "gmpo", "step": 1, "grad_norm": float("nan"), "token_ratio_max": float("inf")},
               {"algo": "gmpo", "step": 2, "grad_norm": 0.5, "token_ratio_max": -float("inf")}]  # fmt: skip
    path = tmp_path / "metrics-gmpo.jsonl"
    path.write_text("".join(json_line(r) + "\n" for r in records) + '{"algo": "gmpo", "st')  # killed mid-line
    back = read_records(path)
    assert [r["step"] for r in back] == [1, 2] and back[0]["algo"] == "gmpo"
    assert math.isnan(back[0]["grad_norm"]) and back[0]["token_ratio_max"] == math.inf
    assert back[1]["token_ratio_max"] == -math.inf
