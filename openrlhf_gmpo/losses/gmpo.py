"""GMPO (Geometric-Mean Policy Optimization, https://arxiv.org/abs/2507.20673) and its paper ablations (Table 4).

GMPO maximises, per sequence i with advantage A_i and |o_i| valid tokens, the geometric mean of the token-level
PPO-clipped objectives (Eq. 4):

    J_i = sgn(A_i) * prod_t | min(rho_t A_i, clip(rho_t, e^-eps_low, e^eps_high) A_i) |^(1/|o_i|)

which in log space (Algorithm 1), with d_t = logp_t - logp_old_t and s = sgn(A_i), is

    d'_t    = s * min(s * d_t, s * clamp(d_t, -eps_low, eps_high))    # (B, L) one-sided clip of the log-ratio
    r_i     = exp( sum_t d'_t / |o_i| )                                 # (B,) geometric-mean ratio of sequence i
    loss_i  = -A_i * r_i                                                # (B,)

eps_low / eps_high are bounds on the *log*-ratio: eps = 0.4 keeps each token's ratio within [e^-0.4, e^0.4] =
[0.670, 1.492] (the paper's default; 0.2 is advised for MoE). For A_i > 0 only the upper side is capped (d'_t =
min(d_t, eps_high)), for A_i < 0 only the lower (d'_t = max(d_t, -eps_low)), exactly as PPO's min does for ratios.
Without clipping, d loss_i / d logp_t = -A_i * r_i / |o_i| for every token (Eq. 6): each token is weighted by its
sequence's geometric-mean ratio, not its own ratio, which is why one outlier token cannot blow up the update.

A_i = 0 sequences use the A > 0 branch; their loss and gradient are 0 either way, and they count no clipped token.
"""

import torch

from openrlhf_gmpo.losses.inputs import LOG_RATIO_LIMIT, SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms, register_loss


def one_sided_bounds(advantages: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper), each (B, 1): (-inf, high) where A >= 0, (low, +inf) where A < 0, for a single clamp pass."""
    positive = (advantages >= 0).unsqueeze(-1)
    lower = torch.where(positive, -torch.inf, low)
    upper = torch.where(positive, high, torch.inf)
    return lower, upper


def split_by_sign(advantages: torch.Tensor, clipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence clip counts (B,) -> (low, high): a one-sided clip is low where A < 0, high where A > 0."""
    clipped = clipped.float()
    return torch.where(advantages < 0, clipped, 0.0), torch.where(advantages > 0, clipped, 0.0)


def clip_log_ratio(batch: SequenceBatch, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d' (B, L), per-sequence count of clipped tokens (B,)) for Algorithm 1's one-sided token clip.

    s*min(s*d, s*clamp(d, -eps_low, eps_high)) equals min(d, eps_high) where A >= 0 and max(d, -eps_low) where
    A < 0, which one clamp with per-sequence bounds computes. Masked positions hold d = 0, inside both bounds.
    """
    lower, upper = one_sided_bounds(batch.advantages, -eps_low, eps_high)
    clipped = batch.log_ratio.clamp(min=lower, max=upper)
    count = (clipped != batch.log_ratio).sum(dim=-1)
    return clipped, count


@register_loss("gmpo")
def gmpo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GMPO, paper Eq. 4 / Algorithm 1: token-level one-sided clip in log space, then the geometric mean."""
    clipped, count = clip_log_ratio(batch, eps_low, eps_high)
    seq_ratio = torch.exp(clipped.sum(dim=-1) / batch.safe_lengths)  # (B,)
    return PolicyLossTerms(
        -batch.advantages * seq_ratio, seq_ratio.detach(), *split_by_sign(batch.advantages, count), "token"
    )


@register_loss("gmpo_no_clip")
def gmpo_no_clip(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation: r_i = exp(mean_t d_t) with no clipping (eps unused; d is still safety-clamped to +-20)."""
    seq_ratio = torch.exp(batch.log_ratio.sum(dim=-1) / batch.safe_lengths)  # (B,)
    none = torch.zeros_like(seq_ratio)
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), none, none, "token")


@register_loss("gmpo_seq_clip")
def gmpo_seq_clip(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation (Table 4): clip the summed log-ratio S_i = sum_t d_t one-sidedly at eps, then divide by |o_i|.

    S'_i = min(S_i, eps_high) for A_i >= 0, max(S_i, -eps_low) for A_i < 0, r_i = exp(S'_i / |o_i|), as the GMPO
    authors' `gmpo_seqclip` does. The bound is on the sum, not the mean: a sequence's geometric-mean ratio may move only
    eps/|o_i| before the whole sequence loses its gradient, so long sequences freeze early; that is what the ablation
    measures against token-level clipping. Clip fractions are counted per sequence (low: A_i < 0 and S_i < -eps_low;
    high: A_i > 0 and S_i > eps_high).
    """
    total = batch.log_ratio.sum(dim=-1)  # (B,)
    lower, upper = one_sided_bounds(batch.advantages, -eps_low, eps_high)
    clipped = total.clamp(min=lower.squeeze(-1), max=upper.squeeze(-1))
    seq_ratio = torch.exp(clipped / batch.safe_lengths)  # (B,)
    low, high = split_by_sign(batch.advantages, clipped != total)
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), low, high, "sequence")


@register_loss("gmpo_no_norm")
def gmpo_no_norm(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation: no 1/|o_i|, r_i = exp(sum_t d'_t) with d'_t the token-clipped log-ratio (the product of ratios).

    The sum can reach |o_i| * eps_high (or 20 |o_i| for A < 0), so it is safety-clamped to +-20 before the exp, like
    a token's log-ratio; a clamped sequence has zero gradient. The paper's point is that this product is unstable.
    """
    clipped, count = clip_log_ratio(batch, eps_low, eps_high)
    seq_ratio = torch.exp(clipped.sum(dim=-1).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))  # (B,)
    return PolicyLossTerms(
        -batch.advantages * seq_ratio, seq_ratio.detach(), *split_by_sign(batch.advantages, count), "token"
    )
