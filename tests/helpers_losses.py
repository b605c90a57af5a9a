"""Shared helpers for the loss tests: a literal per-sequence Python-loop reference of every loss, and batch builders.

The reference follows the paper's formulas token by token (Algorithm 1 with the literal s * min(s*d, s*clamp(d)),
PPO's literal min), in float64, with no vectorisation, so it checks the vectorised code rather than restating it.
"""

import math

import torch


def _sign(a: float) -> float:
    return 1.0 if a >= 0 else -1.0  # A = 0 takes the A > 0 branch; its loss is 0 either way


def reference_seq_loss(name: str, d: torch.Tensor, a: float, eps_low: float, eps_high: float) -> torch.Tensor:
    """loss_i for one sequence; d holds only its valid log-ratios (float64, may require grad)."""
    n = d.numel()
    s = _sign(a)
    if name in ("gmpo", "gmpo_no_norm"):
        d_clipped = s * torch.minimum(s * d, s * d.clamp(-eps_low, eps_high))
        log_r = d_clipped.sum() / n if name == "gmpo" else d_clipped.sum()
        return -a * torch.exp(log_r)
    if name == "gmpo_no_clip":
        return -a * torch.exp(d.sum() / n)
    if name == "gmpo_seq_clip":
        total = d.sum()
        clipped = s * torch.minimum(s * total, s * total.clamp(-eps_low, eps_high))  # the sum itself is bounded
        return -a * torch.exp(clipped / n)
    if name == "grpo":
        ratio = torch.exp(d)
        per_token = [-torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a) for r in ratio]
        return sum(per_token) / n
    if name == "gspo":
        ratio = torch.exp(d.sum() / n)
        return -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    raise AssertionError(f"no reference for {name}")


def reference_loss(
    name, log_probs, old_log_probs, advantages, mask, eps_low, eps_high, global_batch_size=None, dp_size=1
) -> torch.Tensor:
    """Batch loss by a Python loop over sequences; advantages (B,); all-masked sequences are skipped."""
    losses = []
    for i in range(log_probs.shape[0]):
        valid = mask[i].bool()
        if not valid.any():
            continue
        d = log_probs[i][valid].double() - old_log_probs[i][valid].double()
        losses.append(reference_seq_loss(name, d, float(advantages[i]), eps_low, eps_high))
    total = sum(losses) if losses else torch.zeros((), dtype=torch.float64)
    if global_batch_size is None:
        return total / max(len(losses), 1)
    return total / global_batch_size * dp_size


def random_batch(seed: int, batch: int = 6, length: int = 9, scale: float = 0.5, dtype=torch.float32):
    """(log_probs requiring grad, old_log_probs, advantages (B,), mask (B, L) bool) with ragged lengths.

    Row 0 is always fully masked, to check that all-masked sequences are excluded.
    """
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    log_probs = (old + torch.randn(batch, length, generator=g, dtype=torch.float64) * scale).to(dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    mask[0] = False
    advantages = torch.randn(batch, generator=g, dtype=torch.float64).to(dtype)
    return log_probs.requires_grad_(True), old.to(dtype), advantages, mask


def close(actual, expected, tol: float = 1e-5) -> bool:
    as_float = lambda x: float(x.detach()) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
    return math.isclose(as_float(actual), as_float(expected), rel_tol=tol, abs_tol=tol)


def reference_metrics(name: str, log_probs, old_log_probs, advantages, mask, eps_low: float, eps_high: float) -> dict:
    """Clip fractions and ratio ranges by counting token by token (and sequence by sequence) in a Python loop."""
    token_level = name in ("gmpo", "gmpo_no_norm", "grpo")
    ratio_space = name in ("grpo", "gspo")
    low = high = all_clipped = n_tokens = n_seqs = 0
    ratios, seq_ratios, k3 = [], [], []
    for i in range(log_probs.shape[0]):
        d = [float(log_probs[i, t] - old_log_probs[i, t]) for t in range(log_probs.shape[1]) if mask[i, t]]
        if not d:
            continue
        a, n = float(advantages[i]), len(d)
        n_tokens, n_seqs = n_tokens + n, n_seqs + 1
        ratios += [math.exp(x) for x in d]
        k3 += [math.exp(x) - 1 - x for x in d]
        dd = torch.tensor(d, dtype=torch.float64)
        seq_ratios.append(float(reference_seq_loss(name, dd, a, eps_low, eps_high) / -a) if a != 0 else None)
        if token_level:
            lo_bound, hi_bound = (
                (1 - eps_low, 1 + eps_high) if ratio_space else (math.exp(-eps_low), math.exp(eps_high))
            )
            seq_low = sum(1 for x in d if a < 0 and math.exp(x) < lo_bound)
            seq_high = sum(1 for x in d if a > 0 and math.exp(x) > hi_bound)
            low, high = low + seq_low, high + seq_high
            all_clipped += int(seq_low + seq_high == n)
        elif name != "gmpo_no_clip":
            # gspo clips the mean log-ratio (the geometric-mean ratio) in ratio space; gmpo_seq_clip clips the sum
            clipped_value = sum(d) / n if ratio_space else sum(d)
            lo_bound, hi_bound = (
                (math.log(1 - eps_low), math.log(1 + eps_high)) if ratio_space else (-eps_low, eps_high)
            )
            seq_low, seq_high = int(a < 0 and clipped_value < lo_bound), int(a > 0 and clipped_value > hi_bound)
            low, high, all_clipped = low + seq_low, high + seq_high, all_clipped + seq_low + seq_high
    denominator = n_tokens if token_level else n_seqs
    return {
        "clip_frac_low": low / denominator,
        "clip_frac_high": high / denominator,
        "seq_clip_frac": all_clipped / n_seqs,
        "token_ratio_min": min(ratios),
        "token_ratio_max": max(ratios),
        "token_ratio_mean": sum(ratios) / len(ratios),
        "approx_kl": sum(k3) / len(k3),
        "seq_ratios": [r for r in seq_ratios if r is not None],
    }
