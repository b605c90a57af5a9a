"""Hand-computed checks of the stability loop's pure functions (the verdict: test_stability_verdict.py)."""

import math

import pytest
import torch

from openrlhf_gmpo.stability.rl_math import group_advantages, k3_kl, masked_mean, router_load_stats
from openrlhf_gmpo.stability.state import derive_seed


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


def test_group_advantages_need_two_samples_per_group():
    # one sample has no spread: its unbiased std is NaN, so every advantage would be NaN
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([1.0, 2.0]), group_size=1, eps=1e-6)


def test_masked_mean_of_nothing_is_zero():
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0  # not 0/0


def test_router_load_stats_over_two_layers():
    # Each row is one token's router logits over 2 experts; no padding.
    # Max share: the largest share of any expert in any layer. Layer "skewed" sends both tokens to expert 0 (share 1),
    # layer "balanced" one to each (0.5): 1.0, where the last layer alone would give 0.5.
    skewed, balanced = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert router_load_stats((skewed, balanced), torch.ones(1, 2), top_k=1)["expert_max_share"] == pytest.approx(1.0)
    # Entropy: the mean over layers of the normalised per-token entropy. Logits [1, 0]: p = [0.7311, 0.2689],
    # H = 0.5822 nats = 0.8400 of ln 2; all-zero logits: uniform, 1.0. Mean (0.8400 + 1.0) / 2 = 0.9200.
    stats = router_load_stats((balanced, torch.zeros(2, 2)), torch.ones(1, 2), top_k=1)
    assert stats["router_entropy"] == pytest.approx(0.92, abs=1e-4)


def test_derive_seed_is_stable_and_distinct():
    # sha256-based, so the same in every process (str hash() would not be)
    assert derive_seed(1, "sample", "gmpo", 3) == derive_seed(1, "sample", "gmpo", 3)
    assert derive_seed(1, "sample", "gmpo", 3) != derive_seed(1, "sample", "grpo", 3)


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
