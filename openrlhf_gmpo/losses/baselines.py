"""Baselines the GMPO paper compares against, as per-sequence losses on the same contract.

eps_low / eps_high here are bounds on the *ratio* (PPO style: [1 - eps_low, 1 + eps_high]), not on the log-ratio.
"""

import torch

from openrlhf_gmpo.losses.inputs import SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms, register_loss


def _one_sided_ratio_clip(ratio: torch.Tensor, positive: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """min(r A, clip(r, 1-eps_low, 1+eps_high) A) / A: min(r, 1+eps_high) if A >= 0 else max(r, 1-eps_low)."""
    return torch.where(positive, ratio.clamp(max=1.0 + eps_high), ratio.clamp(min=1.0 - eps_low))


@register_loss("grpo")
def grpo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GRPO (https://arxiv.org/abs/2402.03300): the arithmetic mean of PPO-clipped token objectives.

        r_t    = exp(d_t)                                                     # (B, L)
        loss_i = -1/|o_i| sum_t min(r_t A_i, clip(r_t, 1-eps_low, 1+eps_high) A_i)

    then the mean over sequences (the per-sequence token mean, as in the paper's GRPO). The reported sequence ratio
    is the per-sequence arithmetic mean of the clipped token ratios, so loss_i = -A_i * seq_ratio_i. Clip fractions
    count tokens: low when A_i < 0 and r_t < 1-eps_low, high when A_i > 0 and r_t > 1+eps_high.
    """
    ratio = torch.exp(batch.log_ratio)  # (B, L), exp(0) = 1 at masked positions
    adv = batch.advantages.unsqueeze(-1)  # (B, 1)
    clipped = _one_sided_ratio_clip(ratio, adv >= 0, eps_low, eps_high)
    seq_ratio = torch.where(batch.mask, clipped, 0.0).sum(dim=-1) / batch.safe_lengths  # (B,)
    low = batch.mask & (adv < 0) & (ratio < 1.0 - eps_low)
    high = batch.mask & (adv > 0) & (ratio > 1.0 + eps_high)
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), low, high)


@register_loss("gspo")
def gspo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GSPO (https://arxiv.org/abs/2507.18071): clip the sequence's geometric-mean ratio as a whole.

        s_i    = exp( sum_t d_t / |o_i| )                                     # (B,)
        loss_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)

    The gradient flows to every token through s_i (d s_i / d logp_t = s_i / |o_i|) unless the sequence is clipped,
    in which case the whole sequence is dropped. The GSPO paper uses eps_low = 3e-4, eps_high = 4e-4. Clip
    fractions count sequences: low when A_i < 0 and s_i < 1-eps_low, high when A_i > 0 and s_i > 1+eps_high.
    """
    seq_log_ratio = batch.log_ratio.sum(dim=-1) / batch.safe_lengths  # (B,)
    raw = torch.exp(seq_log_ratio)
    seq_ratio = _one_sided_ratio_clip(raw, batch.advantages >= 0, eps_low, eps_high)
    low = batch.valid_seq & (batch.advantages < 0) & (raw < 1.0 - eps_low)
    high = batch.valid_seq & (batch.advantages > 0) & (raw > 1.0 + eps_high)
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), low, high)
