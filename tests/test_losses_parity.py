"""The vectorised losses against the per-sequence Python loop of tests/helpers_losses.py, and Eq. 6 of the paper."""

import pytest
import torch
from helpers_losses import random_batch, reference_loss, reference_metrics

from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss

SEEDS = range(12)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.4, 0.4), (0.1, 0.3)])
def test_loss_and_grad_match_python_loop(name, eps_low, eps_high):
    # scale 0.5 log-ratios put a good share of tokens on both sides of every clip bound
    for seed in SEEDS:
        log_probs, old, advantages, mask = random_batch(seed, dtype=torch.float64)
        loss, _ = compute_policy_loss(
            name, log_probs, old, advantages, mask, clip_eps_low=eps_low, clip_eps_high=eps_high
        )
        (grad,) = torch.autograd.grad(loss, log_probs)
        ref = reference_loss(name, log_probs, old, advantages, mask, eps_low, eps_high)
        (ref_grad,) = torch.autograd.grad(ref, log_probs)
        # fp32 internally, so compare at fp32 precision
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6, msg=f"{name} seed {seed} loss")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6, msg=f"{name} seed {seed} grad")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_global_batch_size_matches_python_loop(name):
    log_probs, old, advantages, mask = random_batch(3, dtype=torch.float64)
    loss, _ = compute_policy_loss(
        name, log_probs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.3, global_batch_size=20, dp_size=4
    )
    ref = reference_loss(name, log_probs, old, advantages, mask, 0.2, 0.3, global_batch_size=20, dp_size=4)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gmpo", "gmpo_no_clip"])
def test_unclipped_gradient_is_paper_eq6(name):
    # Eq. 6: without clipping, d loss_i / d logp_t = -A_i * r_i / |o_i| with r_i the geometric-mean ratio of
    # sequence i, the same weight for every token of the sequence whatever its own ratio.
    log_probs, old, advantages, mask = random_batch(7, scale=0.05, dtype=torch.float64)  # |d| << eps: no clip
    loss, metrics = compute_policy_loss(name, log_probs, old, advantages, mask, clip_eps_low=10, clip_eps_high=10)
    loss.backward()
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
    d = torch.where(mask, log_probs.detach() - old, 0.0)
    lengths = mask.sum(-1)
    valid = lengths > 0
    geo_ratio = torch.exp(d.sum(-1) / lengths.clamp(min=1))  # (B,)
    per_seq_weight = -advantages * geo_ratio / lengths.clamp(min=1) / valid.sum()  # mean over valid sequences
    expected = torch.where(mask, per_seq_weight.unsqueeze(-1), 0.0)
    torch.testing.assert_close(log_probs.grad, expected)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_metrics_match_token_by_token_counts(name):
    for seed in range(6):
        log_probs, old, advantages, mask = random_batch(seed, batch=10)
        advantages[1] = 0.0  # a zero advantage clips on neither side
        _, metrics = compute_policy_loss(name, log_probs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.3)
        ref = reference_metrics(name, log_probs.detach(), old, advantages, mask, 0.2, 0.3)
        for key in ("clip_frac_low", "clip_frac_high", "seq_clip_frac"):
            assert metrics[key].item() == pytest.approx(ref[key], abs=1e-6), (key, seed)
        for key in ("token_ratio_min", "token_ratio_max", "token_ratio_mean", "approx_kl"):
            assert metrics[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, seed)
        # the reported range covers every sequence with a non-zero advantage (ratio = loss_i / -A_i)
        assert metrics["seq_ratio_min"].item() <= min(ref["seq_ratios"]) * (1 + 1e-5)
        assert metrics["seq_ratio_max"].item() >= max(ref["seq_ratios"]) * (1 - 1e-5)
