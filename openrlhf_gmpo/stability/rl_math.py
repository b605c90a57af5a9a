"""Pure tensor functions the stability loop needs: advantages, masked means, entropy, KL, router load balance."""

import math

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GRPO/GMPO advantages: (r - mean) / (std + eps) within each prompt's group of samples.

    rewards: [N] laid out prompt-major (the group_size samples of prompt 0 first). Uses the unbiased std, as GRPO's
    reference implementations do; a group with identical rewards gets all-zero advantages. Returns [N].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to normalise within a group, got {group_size}")
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over positions where mask is 1 (all tokens of the batch pooled)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dim, in nats: [..., V] -> [...]."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on tokens sampled from the policy (Schulman 2020).

    k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased and never negative, unlike the plain log-ratio.
    """
    log_ratio = (ref_log_probs - log_probs).float()
    return log_ratio.exp() - log_ratio - 1


def router_load_stats(
    router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor, top_k: int
) -> dict[str, float]:
    """MoE router balance over valid tokens, from each layer's router logits [B*T, E].

    expert_max_share: the largest fraction of top-k assignments any single expert receives in any layer
    (1/E is perfect balance, 1.0 means one expert takes everything). router_entropy: the mean per-token entropy of the
    routing softmax, normalised by log(E) so 1.0 is uniform and 0.0 is a one-hot (fully confident) router.
    """
    valid = token_mask.reshape(-1).bool()
    max_share, entropies = 0.0, []
    for layer_logits in router_logits:
        logits = layer_logits.float()[valid]  # (n_valid, E)
        n_experts = logits.shape[-1]
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=n_experts).float()
        max_share = max(max_share, (counts.max() / counts.sum().clamp(min=1)).item())
        entropies.append((token_entropy(logits).mean() / math.log(n_experts)).item())
    return {"expert_max_share": max_share, "router_entropy": sum(entropies) / max(len(entropies), 1)}
