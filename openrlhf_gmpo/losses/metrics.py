"""Diagnostics of one policy-loss call: ratio ranges, clip fractions, KL. All 0-d detached fp32 tensors.

Written to need few passes over the (B, L) tensors (this runs on every micro-batch): masked positions hold a
log-ratio of exactly 0, so e^d - 1 and the k3 term vanish there without a mask. A batch without any valid token
reports neutral values (ratios 1, fractions and KL 0) rather than NaN, because OpenRLHF averages every metric over
micro-batches and one NaN would poison the logged mean.
"""

import torch

from openrlhf_gmpo.losses.inputs import SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms


def _valid_range(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of values where mask is True, in one pass: masked entries are replaced by one valid entry."""
    flat_mask = mask.reshape(-1)
    anchor = values.reshape(-1)[flat_mask.to(torch.uint8).argmax()]  # first valid entry (any entry if none)
    return torch.aminmax(torch.where(mask, values, anchor))


@torch.no_grad()
def loss_metrics(batch: SequenceBatch, terms: PolicyLossTerms) -> dict[str, torch.Tensor]:
    """Metrics of the contract; see compute_policy_loss for each key's meaning."""
    d = batch.log_ratio  # (B, L), 0 at masked positions, +-20 safety clamp applied
    n_tokens = batch.lengths.sum()
    any_token = n_tokens > 0
    valid = batch.valid_seq  # (B,)
    n_seqs = valid.sum().clamp(min=1)

    ratio_minus_one = torch.expm1(d)  # (B, L), exactly 0 at masked positions
    token_ratio_mean = 1.0 + ratio_minus_one.sum() / n_tokens.clamp(min=1)
    # k3 estimator of KL(pi_old || pi_new) from tokens sampled by pi_old: with r = pi_new / pi_old = e^d,
    # (r - 1) - log r >= 0, unbiased, and low-variance near r = 1 (http://joschu.net/blog/kl-approx.html).
    approx_kl = (ratio_minus_one - d).sum() / n_tokens.clamp(min=1)
    d_min, d_max = _valid_range(d, batch.mask)
    s_min, s_max = _valid_range(terms.seq_ratio.float(), valid)

    low, high = terms.clipped_low, terms.clipped_high  # (B,), 0 for sequences without valid tokens
    if terms.clip_level == "token":  # fractions of valid tokens; a sequence counts when all its tokens are clipped
        denominator = n_tokens.clamp(min=1)
        every_token_clipped = valid & (low + high >= batch.lengths)
    else:  # fractions of sequences with valid tokens
        denominator = n_seqs
        every_token_clipped = valid & (low + high > 0)

    neutral_one = torch.ones((), device=d.device)
    return {
        "token_ratio_min": torch.where(any_token, torch.exp(d_min), neutral_one),
        "token_ratio_max": torch.where(any_token, torch.exp(d_max), neutral_one),
        "token_ratio_mean": token_ratio_mean,
        "seq_ratio_min": torch.where(any_token, s_min, neutral_one),
        "seq_ratio_max": torch.where(any_token, s_max, neutral_one),
        "clip_frac_low": torch.where(valid, low, 0.0).sum() / denominator,
        "clip_frac_high": torch.where(valid, high, 0.0).sum() / denominator,
        "approx_kl": approx_kl,
        "seq_clip_frac": every_token_clipped.sum() / n_seqs,
    }
