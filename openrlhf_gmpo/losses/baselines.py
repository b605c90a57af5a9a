"""Baselines the GMPO paper compares against, as per-sequence losses on the same contract.

eps_low / eps_high here are bounds on the *ratio* (PPO style: [1 - eps_low, 1 + eps_high]), not on the log-ratio.
"""

import torch

from openrlhf_gmpo.losses.gmpo import one_sided_bounds, split_by_sign
from openrlhf_gmpo.losses.inputs import SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms, register_loss


@register_loss("grpo")
def grpo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GRPO (https://arxiv.org/abs/2402.03300): the arithmetic mean of PPO-clipped token objectives.

        r_t    = exp(d_t)                                                     # (B, L)
        loss_i = -1/|o_i| sum_t min(r_t A_i, clip(r_t, 1-eps_low, 1+eps_high) A_i)    # (B,)

    then the mean over sequences (the per-sequence token mean, as in the paper's GRPO). min(r A, clip(r) A) / A is
    min(r, 1+eps_high) for A >= 0 and max(r, 1-eps_low) for A < 0, so loss_i = -A_i * seq_ratio_i with seq_ratio_i
    the token mean of those one-sidedly clipped ratios (the reported sequence ratio). Clip fractions count tokens:
    low when A_i < 0 and r_t < 1-eps_low, high when A_i > 0 and r_t > 1+eps_high.
    """
    ratio = torch.exp(batch.log_ratio)  # (B, L), exp(0) = 1 at masked positions
    lower, upper = one_sided_bounds(batch.advantages, 1.0 - eps_low, 1.0 + eps_high)
    clipped = ratio.clamp(min=lower, max=upper)  # 1 stays 1 at masked positions: 1 - eps_low < 1 < 1 + eps_high
    count = (clipped != ratio).sum(dim=-1)
    seq_ratio = torch.where(batch.mask, clipped, 0.0).sum(dim=-1) / batch.safe_lengths  # (B,)
    return PolicyLossTerms(
        -batch.advantages * seq_ratio, seq_ratio.detach(), *split_by_sign(batch.advantages, count), "token"
    )


@register_loss("gspo")
def gspo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GSPO (https://arxiv.org/abs/2507.18071): clip the sequence's geometric-mean ratio as a whole.

        s_i    = exp( sum_t d_t / |o_i| )                                     # (B,)
        loss_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)          # (B,)

    The gradient flows to every token through s_i (d s_i / d logp_t = s_i / |o_i|) unless the sequence is clipped,
    in which case the whole sequence is dropped. The GSPO paper uses eps_low = 3e-4, eps_high = 4e-4. Clip
    fractions count sequences: low when A_i < 0 and s_i < 1-eps_low, high when A_i > 0 and s_i > 1+eps_high.
    """
    raw = torch.exp(batch.log_ratio.sum(dim=-1) / batch.safe_lengths)  # (B,)
    lower, upper = one_sided_bounds(batch.advantages, 1.0 - eps_low, 1.0 + eps_high)
    seq_ratio = raw.clamp(min=lower.squeeze(-1), max=upper.squeeze(-1))
    low, high = split_by_sign(batch.advantages, seq_ratio != raw)
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), low, high, "sequence")
