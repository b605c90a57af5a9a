"""GMPO (Geometric-Mean Policy Optimization, https://arxiv.org/abs/2507.20673) and its paper ablations (Table 4).

GMPO maximises, per sequence i with advantage A_i and |o_i| valid tokens, the geometric mean of the token-level
PPO-clipped objectives (Eq. 4):

    J_i = sgn(A_i) * prod_t | min(rho_t A_i, clip(rho_t, e^-eps_low, e^eps_high) A_i) |^(1/|o_i|)

which in log space (Algorithm 1), with d_t = logp_t - logp_old_t and s = sgn(A_i), is

    d'_t    = s * min(s * d_t, s * clamp(d_t, -eps_low, eps_high))    # one-sided clip of the log-ratio
    r_i     = exp( sum_t d'_t / |o_i| )                                 # geometric-mean ratio of sequence i
    loss_i  = -A_i * r_i

eps_low / eps_high are bounds on the *log*-ratio: eps = 0.4 keeps each token's ratio within [e^-0.4, e^0.4] =
[0.670, 1.492] (the paper's default; 0.2 is advised for MoE). For A_i > 0 only the upper side is capped (d'_t =
min(d_t, eps_high)), for A_i < 0 only the lower (d'_t = max(d_t, -eps_low)), exactly as PPO's min does for ratios.
Without clipping, d loss_i / d logp_t = -A_i * r_i / |o_i| for every token (Eq. 6): each token is weighted by its
sequence's geometric-mean ratio, not its own ratio, which is why one outlier token cannot blow up the update.

A_i = 0 sequences use the A > 0 branch; their loss and gradient are 0 either way.
"""

import torch

from openrlhf_gmpo.losses.inputs import LOG_RATIO_LIMIT, SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms, register_loss


def one_sided_token_clip(batch: SequenceBatch, eps_low: float, eps_high: float) -> torch.Tensor:
    """d'_t of Algorithm 1: s*min(s*d, s*clamp(d, -eps_low, eps_high)).

    That equals min(d, eps_high) where A >= 0 and max(d, -eps_low) where A < 0, which is what we compute (B, L).
    """
    positive = (batch.advantages >= 0).unsqueeze(-1)  # (B, 1)
    d = batch.log_ratio  # (B, L)
    return torch.where(positive, d.clamp(max=eps_high), d.clamp(min=-eps_low))  # (B, L)


def token_clip_flags(batch: SequenceBatch, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bools: tokens whose one-sided log-space clip is active (low only when A < 0, high only when A > 0)."""
    adv = batch.advantages.unsqueeze(-1)  # (B, 1)
    low = batch.mask & (adv < 0) & (batch.log_ratio < -eps_low)
    high = batch.mask & (adv > 0) & (batch.log_ratio > eps_high)
    return low, high


def _no_clip_flags(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    none = torch.zeros_like(batch.mask)
    return none, none


def _terms(batch: SequenceBatch, seq_ratio: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> PolicyLossTerms:
    return PolicyLossTerms(-batch.advantages * seq_ratio, seq_ratio.detach(), low, high)


@register_loss("gmpo")
def gmpo(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """GMPO, paper Eq. 4 / Algorithm 1: token-level one-sided clip in log space, then the geometric mean."""
    clipped = one_sided_token_clip(batch, eps_low, eps_high)  # (B, L), 0 at masked positions
    seq_ratio = torch.exp(clipped.sum(dim=-1) / batch.safe_lengths)  # (B,)
    return _terms(batch, seq_ratio, *token_clip_flags(batch, eps_low, eps_high))


@register_loss("gmpo_no_clip")
def gmpo_no_clip(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation: r_i = exp(mean_t d_t) with no clipping (eps unused; d is still safety-clamped to +-20)."""
    seq_ratio = torch.exp(batch.log_ratio.sum(dim=-1) / batch.safe_lengths)  # (B,)
    return _terms(batch, seq_ratio, *_no_clip_flags(batch))


@register_loss("gmpo_seq_clip")
def gmpo_seq_clip(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation: clip the summed log-ratio S_i = sum_t d_t one-sidedly, then divide by |o_i|.

    The bound on the sum is |o_i| * eps: S'_i = min(S_i, |o_i| eps_high) for A_i >= 0, max(S_i, -|o_i| eps_low) for
    A_i < 0, and r_i = exp(S'_i / |o_i|). Scaling the bound by the length keeps the sequence ratio in the same range
    [e^-eps_low, e^eps_high] as token-level clipping, so this ablation differs from GMPO only in *where* the clip acts
    (on the whole sequence, keeping or zeroing every token's gradient together), not in how far the ratio may move;
    a bound of eps on the sum itself would shrink the allowed geometric-mean move to eps/|o_i| and freeze long
    sequences. Clip fractions are counted per sequence (low: A_i < 0 and S_i < -|o_i| eps_low; high: A_i > 0 and
    S_i > |o_i| eps_high).
    """
    total = batch.log_ratio.sum(dim=-1)  # (B,)
    upper, lower = batch.lengths * eps_high, -batch.lengths * eps_low
    positive = batch.advantages >= 0
    clipped = torch.where(positive, torch.minimum(total, upper), torch.maximum(total, lower))
    seq_ratio = torch.exp(clipped / batch.safe_lengths)  # (B,)
    low = batch.valid_seq & (batch.advantages < 0) & (total < lower)
    high = batch.valid_seq & (batch.advantages > 0) & (total > upper)
    return _terms(batch, seq_ratio, low, high)


@register_loss("gmpo_no_norm")
def gmpo_no_norm(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Ablation: no 1/|o_i|, r_i = exp(sum_t d'_t) with d'_t the token-clipped log-ratio (the product of ratios).

    The sum can reach |o_i| * eps_high (or -20 |o_i|), so it is safety-clamped to +-20 before the exp, like a token's
    log-ratio; a clamped sequence has zero gradient. The paper's point is that this product is unstable.
    """
    clipped = one_sided_token_clip(batch, eps_low, eps_high)
    seq_ratio = torch.exp(clipped.sum(dim=-1).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))  # (B,)
    return _terms(batch, seq_ratio, *token_clip_flags(batch, eps_low, eps_high))
