"""Numerical properties of every loss: extreme inputs, masked garbage, dtypes, sequence order, DP/micro-batch splits."""

import pytest
import torch
from helpers_losses import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss

EPS = dict(clip_eps_low=0.2, clip_eps_high=0.3)
EXTREME = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def extreme_batches(draw):
    """Small batches with log-ratios anywhere in +-1e4, zero advantages possible, garbage at masked positions."""
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    d = torch.tensor(draw(st.lists(EXTREME, min_size=batch * length, max_size=batch * length))).reshape(batch, length)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
    mask = mask.reshape(batch, length)
    advantages = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 1e3, -2.5]), min_size=batch, max_size=batch))
    )
    garbage = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
    log_probs = torch.where(mask, d, garbage)
    return log_probs, torch.zeros(batch, length), advantages, mask


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=40, deadline=None)
@given(data=extreme_batches())
def test_finite_loss_and_grad_for_extreme_inputs(name, data):
    log_probs, old, advantages, mask = data
    log_probs.requires_grad_(True)
    loss, metrics = compute_policy_loss(name, log_probs, old, advantages, mask, rollout_log_probs=old - 3, **EPS)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(log_probs.grad).all()
    assert (log_probs.grad[~mask] == 0).all()  # masked positions never receive gradient
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_for_long_sequences_of_extreme_log_ratios(name, sign):
    # 64 tokens all at +-1e4 (clamped to +-20): an unclamped sum of 64 * 20 = 1280 would overflow exp in fp32
    log_probs = torch.full((2, 64), sign * 1e4, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    loss, metrics = compute_policy_loss(name, log_probs, torch.zeros(2, 64), advantages, torch.ones(2, 64), **EPS)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), garbage=st.sampled_from([float("nan"), float("inf"), -1e4, 7.0]))
def test_masked_positions_are_ignored(name, seed, garbage):
    log_probs, old, advantages, mask = random_batch(seed)
    clean, _ = compute_policy_loss(name, log_probs, old, advantages, mask, **EPS)
    dirty, _ = compute_policy_loss(
        name,
        torch.where(mask, log_probs, garbage),
        torch.where(mask, old, -garbage),
        advantages,
        mask,
        **EPS,
    )
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(name, dtype):
    log_probs, old, advantages, mask = random_batch(11)
    low = [t.detach().to(dtype) for t in (log_probs, old, advantages)]
    loss_low, _ = compute_policy_loss(name, low[0].requires_grad_(True), low[1], low[2], mask, **EPS)
    # the same rounded values given as fp32 give the identical loss: nothing is computed in low precision
    loss_rounded, _ = compute_policy_loss(name, *[t.float() for t in low], mask, **EPS)
    assert loss_low.dtype == torch.float32 and torch.equal(loss_low, loss_rounded)
    # and the rounding of the inputs moves the loss by about the input precision only
    loss_fp32, _ = compute_policy_loss(name, log_probs, old, advantages, mask, **EPS)
    torch.testing.assert_close(loss_low, loss_fp32, rtol=0.05, atol=0.02)
    loss_low.backward()
    assert low[0].grad.dtype == dtype and torch.isfinite(low[0].grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_sequence_order_does_not_matter(name, seed):
    log_probs, old, advantages, mask = random_batch(seed)
    perm = torch.randperm(log_probs.shape[0], generator=torch.Generator().manual_seed(seed))
    loss, metrics = compute_policy_loss(name, log_probs, old, advantages, mask, **EPS)
    (grad,) = torch.autograd.grad(loss, log_probs)
    loss_p, metrics_p = compute_policy_loss(name, log_probs[perm], old[perm], advantages[perm], mask[perm], **EPS)
    (grad_p,) = torch.autograd.grad(loss_p, log_probs)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad)  # both are gradients w.r.t. the same unpermuted leaf
    for key in metrics:
        torch.testing.assert_close(metrics_p[key], metrics[key], msg=key)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_dp_and_micro_batch_split_gives_the_unsplit_gradient(name):
    # 8 sequences (row 0 all-masked) -> 2 DP ranks x 2 micro-batches of 2. Each micro-batch is given the global
    # count of sequences with valid tokens; a rank sums its micro-batch gradients (gradient accumulation) and the
    # ranks are averaged (DDP all-reduce). That must equal the gradient of the whole batch in one call.
    log_probs, old, advantages, mask = random_batch(5, batch=8)
    rollout = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    loss, _ = compute_policy_loss(name, log_probs, old, advantages, mask, rollout_log_probs=rollout, **EPS)
    (unsplit,) = torch.autograd.grad(loss, log_probs)

    dp_size, n_valid = 2, int((mask.sum(-1) > 0).sum())
    rank_grads = []
    for rank in range(dp_size):
        grad = torch.zeros_like(log_probs)
        for micro in range(2):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            micro_loss, _ = compute_policy_loss(
                name,
                log_probs[rows],
                old[rows],
                advantages[rows],
                mask[rows],
                rollout_log_probs=rollout[rows],
                global_batch_size=torch.tensor(float(n_valid)),
                dp_size=dp_size,
                **EPS,
            )
            grad += torch.autograd.grad(micro_loss, log_probs)[0]
        rank_grads.append(grad)
    torch.testing.assert_close(sum(rank_grads) / dp_size, unsplit)
