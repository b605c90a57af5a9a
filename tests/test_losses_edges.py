"""Hand-computed values at the loss family's edges: the +-20 safety clamps, the A = 0 branch, metrics next to
padding, per-token advantages next to masked garbage, and what gets no gradient.

Each case here was a mutation of the package that the rest of the suite let through (a mutation-testing pass in the
seventh session): the formula could change without any test noticing.
"""

import math

import pytest
import torch

from openrlhf_gmpo.losses import LOG_RATIO_LIMIT, compute_policy_loss

E = math.exp


def loss_of(name, d, advantages, mask=None, eps=0.2, **kwargs):
    """(loss, metrics, d.grad) with old log-probs 0, so `d` are the log-ratios."""
    log_probs = torch.tensor(d, requires_grad=True)
    mask = torch.ones_like(log_probs) if mask is None else torch.tensor(mask)
    old = torch.zeros_like(log_probs)
    loss, metrics = compute_policy_loss(
        name, log_probs, old, torch.tensor(advantages), mask, clip_eps_low=eps, clip_eps_high=eps, **kwargs
    )
    loss.backward()
    return loss, metrics, log_probs.grad


def test_the_safety_limit_is_twenty():
    assert LOG_RATIO_LIMIT == 20.0  # e^20 ~ 4.9e8 is still well inside fp32; e^40 would not be a safety limit


def test_gmpo_no_norm_clamps_the_summed_log_ratio_from_above():
    # A < 0 clips only the lower side, so d = 15, 15 pass; their sum 30 is clamped to +20 and the loss is
    # -A * e^20 = e^20. A clamped sequence gets no gradient.
    loss, _, grad = loss_of("gmpo_no_norm", [[15.0, 15.0]], [-1.0])
    assert loss.item() == pytest.approx(E(20), rel=1e-5)
    assert torch.equal(grad, torch.zeros(1, 2))


def test_gmpo_no_norm_clamps_the_summed_log_ratio_from_below():
    # A > 0 clips only the upper side: d = -15, -15 pass, the sum -30 is clamped to -20.
    _, metrics, grad = loss_of("gmpo_no_norm", [[-15.0, -15.0]], [1.0])
    assert metrics["seq_ratio_min"].item() == pytest.approx(E(-20), rel=1e-5)
    assert torch.equal(grad, torch.zeros(1, 2))


def test_unclipped_token_log_ratio_is_clamped_at_the_limit():
    # No clip at all: d = 30 is clamped to 20 before the exp.
    _, metrics, grad = loss_of("gmpo_no_clip", [[30.0]], [1.0])
    assert metrics["seq_ratio_max"].item() == pytest.approx(E(20), rel=1e-5)
    assert torch.equal(grad, torch.zeros(1, 1))


def test_zero_advantage_takes_the_positive_branch():
    # A = 0 uses the A >= 0 branch (cap above at eps): d = 1 becomes 0.2, so the sequence ratio is e^0.2, not e^1.
    _, metrics, _ = loss_of("gmpo", [[1.0]], [0.0])
    assert metrics["seq_ratio_max"].item() == pytest.approx(E(0.2), rel=1e-6)


def test_token_ratio_range_ignores_padding():
    # Valid ratios e^0.5 and e^0.3, both above 1; the padded position (ratio 1 after masking) is not the minimum.
    _, metrics, _ = loss_of("gmpo", [[0.5, 0.3, float("nan")]], [1.0], mask=[[1, 1, 0]], eps=1.0)
    assert metrics["token_ratio_min"].item() == pytest.approx(E(0.3), rel=1e-6)


def test_sequence_ratio_range_ignores_an_all_masked_row():
    # grpo's sequence ratio of the masked row would be 0 (no tokens); the minimum is the valid row's e^0.1.
    _, metrics, _ = loss_of("grpo", [[0.1, 0.1], [0.0, 0.0]], [1.0, 1.0], mask=[[1, 1], [0, 0]], eps=0.5)
    assert metrics["seq_ratio_min"].item() == pytest.approx(E(0.1), rel=1e-6)


def test_rollout_weight_mean_skips_all_masked_rows():
    # Row 0: mean(old - rollout) = ln 1.5, weight 1.5 (under the cap 5); row 1 has no tokens and does not count.
    rollout = torch.tensor([[-math.log(1.5)] * 2, [0.0, 0.0]])
    _, metrics, _ = loss_of("gmpo", [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], mask=[[1, 1], [0, 0]],
                            rollout_log_probs=rollout, rollout_is_cap=5.0)  # fmt: skip
    assert metrics["rollout_is_weight_mean"].item() == pytest.approx(1.5, rel=1e-6)


def test_per_token_advantages_of_an_all_masked_row_are_ignored():
    # OpenRLHF's (B, L) layout: row 1 holds garbage (7, -3) but no valid token, so it is not "varying". Row 0:
    # A = 1, d = 0, loss -1 over one valid sequence.
    loss, _, _ = loss_of("gmpo", [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [7.0, -3.0]], mask=[[1, 1], [0, 0]])
    assert loss.item() == pytest.approx(-1.0)


def test_masked_per_token_advantage_below_the_value_is_ignored():
    # The masked -123 is not the sequence's advantage (-1): loss = -A * 1 = 1.
    loss, _, _ = loss_of("gmpo", [[0.0, 0.0, 0.0]], [[-1.0, -1.0, -123.0]], mask=[[1, 1, 0]])
    assert loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "advantages,varies",
    [
        ([[1.0, 1.001, 1.0]], True),  # a spread of 1e-3 at |A| = 1 is not rounding
        ([[1000.0, 1000.005]], False),  # relative: 5e-6 of |A|
        ([[0.0, 5e-7]], False),  # absolute, near zero
    ],
)
def test_per_token_advantages_must_be_constant_up_to_rounding(advantages, varies):
    d = [[0.0] * len(advantages[0])]
    if varies:
        with pytest.raises(ValueError, match="must be constant"):
            loss_of("gmpo", d, advantages)
    else:
        loss_of("gmpo", d, advantages)


def test_old_log_probs_get_no_gradient():
    old = torch.zeros(1, 2, requires_grad=True)
    log_probs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = compute_policy_loss(
        "gmpo", log_probs, old, torch.tensor([1.0]), torch.ones(1, 2), clip_eps_low=0.2, clip_eps_high=0.2
    )
    loss.backward()
    assert old.grad is None and log_probs.grad is not None
