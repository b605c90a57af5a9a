"""`compute_policy_loss`: the one entry point the OpenRLHF adapter and the demo call."""

import math

import torch

from openrlhf_gmpo.losses.inputs import check_dp_size, check_positive, prepare_batch
from openrlhf_gmpo.losses.metrics import loss_metrics
from openrlhf_gmpo.losses.registry import get_loss


def compute_policy_loss(
    name: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    rollout_log_probs: torch.Tensor | None = None,
    global_batch_size=None,
    dp_size: int = 1,
    rollout_is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss `name` (one of LOSS_NAMES) over a batch of B sequences padded to L tokens.

    Args:
        log_probs: (B, L) log-probabilities of the sampled tokens under the current policy (any float dtype;
            computed in fp32).
        old_log_probs: (B, L) the same under the policy that generated the batch (treated as constants).
        advantages: (B,) or (B, L); a (B, L) tensor must be constant over each sequence's valid tokens.
        action_mask: (B, L) bool or 0/1; True at response tokens. Values at masked positions are ignored, NaN/inf
            included; sequences without valid tokens are excluded from the loss and the metrics.
        clip_eps_low, clip_eps_high: clip bounds, > 0. Log-space for the gmpo family (ratio in
            [e^-eps_low, e^eps_high]), ratio-space for grpo/gspo ([1 - eps_low, 1 + eps_high]).
        rollout_log_probs: (B, L) log-probabilities from the rollout engine (vLLM). When given, each sequence's loss
            is multiplied by the detached truncated importance weight
            w_i = min(exp(mean_t(old_log_probs - rollout_log_probs)), rollout_is_cap), a per-sequence geometric mean
            that corrects the trainer/rollout mismatch.
        global_batch_size: number of sequences in the whole optimizer step over all DP ranks (a number or 0-d
            tensor, as OpenRLHF's get_loss_batch_info returns). When given, loss = sum_i loss_i / global_batch_size *
            dp_size (OpenRLHF's aggregate_loss convention), so summing gradients over micro-batches and averaging them
            over DP ranks equals the gradient of the unsplit batch. (OpenRLHF 0.11.2 divides this count by the
            gradient-accumulation steps before passing it, to offset DeepSpeed's 1/gas scaling of each micro-batch's
            loss; pass it through as given.) Without it: mean of loss_i over sequences with at least one valid token.
        dp_size: data-parallel world size, >= 1.
        rollout_is_cap: truncation threshold of the rollout importance weight, > 0.

    Returns:
        loss: 0-d fp32 tensor.
        metrics: 0-d detached fp32 tensors: token_ratio_{min,max,mean} (unclipped e^d over valid tokens),
            seq_ratio_{min,max} (the clipped sequence ratio the loss uses), clip_frac_{low,high} (one-sided: low only
            where A < 0, high only where A > 0; fractions of tokens, or of sequences for gspo / gmpo_seq_clip),
            approx_kl (k3 estimate of KL(old || new)), seq_clip_frac (sequences whose every valid token is clipped,
            or whose sequence ratio is clipped), and rollout_is_weight_mean when rollout_log_probs is given.

    Raises:
        ValueError naming the offending argument: unknown name, bad shapes, eps <= 0, NaN/inf at a valid position,
        non-boolean mask values, bad dp_size / global_batch_size / rollout_is_cap.
    """
    loss_fn = get_loss(name)
    eps_low = check_positive("clip_eps_low", clip_eps_low)
    eps_high = check_positive("clip_eps_high", clip_eps_high)
    check_positive("rollout_is_cap", rollout_is_cap)
    dp_size = check_dp_size(dp_size)
    batch, rollout_log_ratio, gbs = prepare_batch(
        log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, global_batch_size
    )

    terms = loss_fn(batch, eps_low=eps_low, eps_high=eps_high)
    seq_loss = terms.seq_loss  # (B,)
    metrics = loss_metrics(batch, terms)

    if rollout_log_ratio is not None:
        # Capped in log space so the exp never overflows; detached because it corrects the sampling distribution.
        log_w = (rollout_log_ratio.sum(dim=-1) / batch.safe_lengths).clamp(max=math.log(rollout_is_cap))
        weight = torch.exp(log_w)  # (B,)
        seq_loss = seq_loss * weight
        valid = batch.valid_seq
        metrics["rollout_is_weight_mean"] = torch.where(valid, weight, 0.0).sum() / valid.sum().clamp(min=1)

    total = torch.where(batch.valid_seq, seq_loss, 0.0).sum()
    if gbs is None:
        loss = total / batch.valid_seq.sum().clamp(min=1)
    else:
        loss = total / gbs * dp_size
    return loss, metrics
