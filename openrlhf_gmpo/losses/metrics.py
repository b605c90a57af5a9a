"""Diagnostics of one policy-loss call: ratio ranges, clip fractions, KL. All 0-d detached fp32 tensors.

A batch without any valid token reports neutral values (ratios 1, fractions and KL 0) rather than NaN, because
OpenRLHF averages every metric over micro-batches and one NaN would poison the logged mean.
"""

import torch

from openrlhf_gmpo.losses.inputs import SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms


def _masked_stats(values: torch.Tensor, mask: torch.Tensor, neutral: float) -> tuple[torch.Tensor, ...]:
    """(min, max, mean) of values where mask is True; `neutral` for all three when nothing is selected."""
    count = mask.sum()
    any_valid = count > 0
    lo = torch.where(mask, values, torch.inf).amin()
    hi = torch.where(mask, values, -torch.inf).amax()
    mean = torch.where(mask, values, 0.0).sum() / count.clamp(min=1)
    return tuple(torch.where(any_valid, v, neutral) for v in (lo, hi, mean))


def _fraction(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (flags & mask).sum(dtype=torch.float32) / mask.sum(dtype=torch.float32).clamp(min=1.0)


@torch.no_grad()
def loss_metrics(batch: SequenceBatch, terms: PolicyLossTerms) -> dict[str, torch.Tensor]:
    """Metrics of the contract; see compute_policy_loss for each key's meaning."""
    token_ratio = torch.exp(batch.log_ratio)  # (B, L) unclipped, after the +-20 safety clamp
    tmin, tmax, tmean = _masked_stats(token_ratio, batch.mask, 1.0)
    smin, smax, _ = _masked_stats(terms.seq_ratio.float(), batch.valid_seq, 1.0)

    if terms.clipped_low.dim() == 2:  # token-level clipping: fractions of valid tokens
        low = _fraction(terms.clipped_low, batch.mask)
        high = _fraction(terms.clipped_high, batch.mask)
        every_token = ((terms.clipped_low | terms.clipped_high) | ~batch.mask).all(dim=-1)  # (B,)
        seq_clip = _fraction(every_token, batch.valid_seq)
    else:  # sequence-level clipping: fractions of sequences with valid tokens
        low = _fraction(terms.clipped_low, batch.valid_seq)
        high = _fraction(terms.clipped_high, batch.valid_seq)
        seq_clip = _fraction(terms.clipped_low | terms.clipped_high, batch.valid_seq)

    # k3 estimator of KL(pi_old || pi_new) from tokens sampled by pi_old: with r = pi_new / pi_old = e^d,
    # (r - 1) - log r >= 0, unbiased, and low-variance near r = 1 (http://joschu.net/blog/kl-approx.html).
    k3 = torch.expm1(batch.log_ratio) - batch.log_ratio
    _, _, kl = _masked_stats(k3, batch.mask, 0.0)
    return {
        "token_ratio_min": tmin,
        "token_ratio_max": tmax,
        "token_ratio_mean": tmean,
        "seq_ratio_min": smin,
        "seq_ratio_max": smax,
        "clip_frac_low": low,
        "clip_frac_high": high,
        "approx_kl": kl,
        "seq_clip_frac": seq_clip,
    }
