"""Hand-computed values for every loss name, the registry, and the reduction conventions."""

import math

import pytest
import torch
from helpers_losses import close

from openrlhf_gmpo.losses import LOSS_NAMES, PolicyLossTerms, compute_policy_loss, register_loss, registry

E = math.exp


def hand_batch():
    """Two sequences, old log-probs 0 so log_probs are the log-ratios d.

    seq 0: A = +1, d = [0.0, 0.5, 0.1], all valid
    seq 1: A = -1, d = [-0.5, 0.0, <masked, NaN>]
    """
    log_probs = torch.tensor([[0.0, 0.5, 0.1], [-0.5, 0.0, float("nan")]], requires_grad=True)
    old = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return log_probs, old, advantages, mask


def run(name, eps=0.2, **kwargs):
    return compute_policy_loss(name, *hand_batch(), clip_eps_low=eps, clip_eps_high=eps, **kwargs)


def test_loss_names_are_the_contract():
    assert set(LOSS_NAMES) == {"gmpo", "gmpo_no_clip", "gmpo_seq_clip", "gmpo_no_norm", "grpo", "gspo"}


def test_gmpo_hand_computed():
    loss, m = run("gmpo")
    # seq 0 (A > 0): only the upper side is capped, d' = [0, 0.2, 0.1] -> ratio e^(0.3/3) = e^0.1
    # seq 1 (A < 0): only the lower side is capped, d' = [-0.2, 0] -> ratio e^(-0.2/2) = e^-0.1
    # loss = mean(-1 * e^0.1, +1 * e^-0.1) = -sinh(0.1) = -0.100167
    assert close(loss, (-E(0.1) + E(-0.1)) / 2)
    assert close(m["seq_ratio_min"], E(-0.1)) and close(m["seq_ratio_max"], E(0.1))
    # token ratios over the 5 valid tokens, unclipped: [1, e^0.5, e^0.1, e^-0.5, 1]
    assert close(m["token_ratio_min"], E(-0.5)) and close(m["token_ratio_max"], E(0.5))
    assert close(m["token_ratio_mean"], (1 + E(0.5) + E(0.1) + E(-0.5) + 1) / 5)
    # one token clipped high (0.5 > 0.2 with A > 0), one low (-0.5 < -0.2 with A < 0), out of 5 valid tokens
    assert close(m["clip_frac_high"], 1 / 5) and close(m["clip_frac_low"], 1 / 5)
    assert close(m["seq_clip_frac"], 0.0)
    # k3 = e^d - 1 - d per token: [0, e^0.5 - 1.5, e^0.1 - 1.1, e^-0.5 - 0.5, 0], mean over 5
    assert close(m["approx_kl"], (E(0.5) - 1.5 + E(0.1) - 1.1 + E(-0.5) - 0.5) / 5)


def test_gmpo_gradient_hand_computed():
    log_probs, old, advantages, mask = hand_batch()
    loss, _ = compute_policy_loss("gmpo", log_probs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    loss.backward()
    # d loss / d logp_t = (1/2 sequences) * -A_i * r_i / |o_i| on unclipped tokens, 0 on clipped ones.
    g0, g1 = -E(0.1) / 3 / 2, E(-0.1) / 2 / 2
    expected = torch.tensor([[g0, 0.0, g0], [0.0, g1, 0.0]])  # the masked NaN position gets gradient 0
    torch.testing.assert_close(log_probs.grad, expected)


@pytest.mark.parametrize("name,bound", [("gmpo", 0.2), ("gmpo_no_norm", 0.2), ("grpo", 0.2)])
def test_clipping_is_one_sided(name, bound):
    # A > 0 with d = [-1, 0]: only the upper side is capped, so the -1 passes unclipped
    # A < 0 with d = [+1, 0]: only the lower side is capped, so the +1 passes unclipped
    log_probs = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    loss, m = compute_policy_loss(
        name,
        log_probs,
        torch.zeros(2, 2),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 2),
        clip_eps_low=bound,
        clip_eps_high=bound,
    )
    seq = {
        "gmpo": (E(-0.5), E(0.5)),  # geometric means e^(-1/2), e^(1/2)
        "gmpo_no_norm": (E(-1.0), E(1.0)),  # products e^-1, e^1
        "grpo": ((E(-1.0) + 1) / 2, (E(1.0) + 1) / 2),  # token means of the ratios
    }[name]
    assert close(loss, (-seq[0] + seq[1]) / 2)
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0


def test_gmpo_no_clip_hand_computed():
    loss, m = run("gmpo_no_clip")
    # seq 0 ratio e^(0.6/3) = e^0.2, seq 1 ratio e^(-0.5/2) = e^-0.25: loss = (-e^0.2 + e^-0.25) / 2
    assert close(loss, (-E(0.2) + E(-0.25)) / 2)
    assert close(m["seq_ratio_max"], E(0.2)) and close(m["seq_ratio_min"], E(-0.25))
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0 and m["seq_clip_frac"] == 0


def test_gmpo_seq_clip_hand_computed():
    loss, m = run("gmpo_seq_clip", eps=0.1)
    # The bound is on the sum itself (the authors' gmpo_seqclip), not on the mean:
    # seq 0: sum 0.6 > eps_high = 0.1 -> 0.1, ratio e^(0.1/3)
    # seq 1: sum -0.5 < -eps_low = -0.1 -> -0.1, ratio e^(-0.1/2)
    assert close(loss, (-E(0.1 / 3) + E(-0.1 / 2)) / 2)
    # sequence-level counts: one of two sequences clipped high, one low; both sequences clipped
    assert close(m["clip_frac_high"], 0.5) and close(m["clip_frac_low"], 0.5) and close(m["seq_clip_frac"], 1.0)


def test_gmpo_no_norm_hand_computed():
    loss, m = run("gmpo_no_norm")
    # token-clipped sums as for gmpo, not divided by length: seq 0 e^0.3, seq 1 e^-0.2
    assert close(loss, (-E(0.3) + E(-0.2)) / 2)
    assert close(m["seq_ratio_max"], E(0.3)) and close(m["seq_ratio_min"], E(-0.2))


def test_grpo_hand_computed():
    loss, m = run("grpo")
    # seq 0 (A > 0): ratios [1, e^0.5 -> 1.2 (1 + eps), e^0.1], token mean (1 + 1.2 + e^0.1) / 3
    # seq 1 (A < 0): ratios [e^-0.5 = 0.607 -> 0.8 (1 - eps), 1], token mean 0.9
    seq0, seq1 = (1 + 1.2 + E(0.1)) / 3, 0.9
    assert close(loss, (-seq0 + seq1) / 2)
    assert close(m["seq_ratio_max"], seq0) and close(m["seq_ratio_min"], seq1)
    assert close(m["clip_frac_high"], 1 / 5) and close(m["clip_frac_low"], 1 / 5)


def test_gspo_hand_computed():
    loss, m = run("gspo")
    # seq 0: s = e^0.2 = 1.221 > 1.2 with A > 0 -> 1.2; seq 1: s = e^-0.25 = 0.779 < 0.8 with A < 0 -> 0.8
    assert close(loss, (-1.2 + 0.8) / 2)
    assert close(m["seq_ratio_max"], 1.2) and close(m["seq_ratio_min"], 0.8)
    assert close(m["clip_frac_high"], 0.5) and close(m["clip_frac_low"], 0.5) and close(m["seq_clip_frac"], 1.0)


def test_gspo_gradient_flows_through_every_token():
    log_probs = torch.tensor([[0.05, -0.05, 0.1]], requires_grad=True)
    loss, _ = compute_policy_loss(
        "gspo", log_probs, torch.zeros(1, 3), torch.tensor([2.0]), torch.ones(1, 3), clip_eps_low=0.2, clip_eps_high=0.2
    )
    loss.backward()
    # s = e^(0.1/3) inside [0.8, 1.2]: d loss / d logp_t = -A * s / |o| = -2 e^(1/30) / 3 for each token
    torch.testing.assert_close(log_probs.grad, torch.full((1, 3), -2 * E(1 / 30) / 3))


def test_global_batch_size_reduction():
    # OpenRLHF's aggregate_loss: sum of per-sequence losses / global_batch_size * dp_size
    loss, _ = run("gmpo", global_batch_size=8, dp_size=2)
    assert close(loss, (-E(0.1) + E(-0.1)) / 8 * 2)
    loss_t, _ = run("gmpo", global_batch_size=torch.tensor(8.0), dp_size=2)  # OpenRLHF passes a 0-d tensor
    assert close(loss_t, loss)


def test_rollout_importance_weight():
    log_probs, old, advantages, mask = hand_batch()
    # seq 0: mean(old - rollout) = ln 3 -> w = min(3, cap 2) = 2
    # seq 1: mean(old - rollout) = 0.1 over its 2 valid tokens (the masked 5.0 is ignored) -> w = e^0.1
    rollout = torch.tensor([[-math.log(3)] * 3, [-0.1, -0.1, 5.0]])
    loss, m = compute_policy_loss(
        "gmpo", log_probs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2, rollout_log_probs=rollout
    )
    # the weights multiply the gmpo losses -e^0.1 and +e^-0.1
    assert close(loss, (-E(0.1) * 2 + E(-0.1) * E(0.1)) / 2)
    assert close(m["rollout_is_weight_mean"], (2 + E(0.1)) / 2)


def test_all_masked_sequence_is_excluded():
    log_probs, old, advantages, mask = hand_batch()
    log_probs = torch.cat([log_probs, torch.full((1, 3), float("inf"))])
    loss, _ = compute_policy_loss(
        "gmpo",
        log_probs,
        torch.cat([old, torch.zeros(1, 3)]),
        torch.cat([advantages, torch.tensor([float("nan")])]),
        torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)]),
        clip_eps_low=0.2,
        clip_eps_high=0.2,
    )
    assert close(loss, (-E(0.1) + E(-0.1)) / 2)  # still the mean over the 2 sequences with valid tokens


def test_per_token_advantages_taken_per_sequence():
    log_probs, old, _, mask = hand_batch()
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 123.0]])  # masked position may hold anything
    loss, _ = compute_policy_loss("gmpo", log_probs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    assert close(loss, (-E(0.1) + E(-0.1)) / 2)


def test_metrics_are_detached_fp32_scalars():
    _, metrics = run("gmpo", rollout_log_probs=torch.zeros(2, 3))
    for key, value in metrics.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, key


def test_register_loss_and_unknown_name():
    def constant(batch, *, eps_low, eps_high):
        ratio = torch.ones_like(batch.advantages)
        none = torch.zeros_like(ratio)
        return PolicyLossTerms(-batch.advantages * ratio, ratio, none, none, "token")

    register_loss("test_constant_ratio")(constant)
    try:
        loss, _ = run("test_constant_ratio")
        assert close(loss, 0.0)  # mean(-1 * 1, +1 * 1)
    finally:
        registry._LOSSES.pop("test_constant_ratio")  # keep the process-wide registry as other tests expect it
    with pytest.raises(ValueError, match="already registered"):
        register_loss("gmpo")(constant)
    with pytest.raises(ValueError, match=r"name: unknown policy loss 'gmpoo'; known losses: .*gmpo_no_clip"):
        run("gmpoo")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batch_without_valid_tokens_gives_zero_loss_and_neutral_metrics(name):
    log_probs = torch.full((2, 3), float("nan"), requires_grad=True)
    loss, metrics = compute_policy_loss(
        name, log_probs, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), clip_eps_low=0.2, clip_eps_high=0.2
    )
    loss.backward()
    assert loss.item() == 0.0 and (log_probs.grad == 0).all()
    # ratios report 1 and fractions / KL 0 rather than NaN, which would poison OpenRLHF's averaged logs
    assert {k: v.item() for k, v in metrics.items()} == {
        "token_ratio_min": 1.0,
        "token_ratio_max": 1.0,
        "token_ratio_mean": 1.0,
        "seq_ratio_min": 1.0,
        "seq_ratio_max": 1.0,
        "clip_frac_low": 0.0,
        "clip_frac_high": 0.0,
        "approx_kl": 0.0,
        "seq_clip_frac": 0.0,
    }
