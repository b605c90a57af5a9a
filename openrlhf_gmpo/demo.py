"""`openrlhf-gmpo demo`: every policy loss on one seeded batch with a few outlier token log-ratios.

MoE routing changes between the rollout and the update make a few tokens' probabilities jump (|log-ratio| of several
nats) while the rest barely move. GRPO weights each token's gradient by that token's own ratio, so one outlier can
dominate the update; GMPO weights every token by its sequence's geometric-mean ratio, which one outlier barely moves.
This demo makes that visible in a table; it runs on CPU in about a second.
"""

import argparse
import json
import math
from pathlib import Path

# Clip bounds used per loss: the papers' defaults (GMPO: log-space 0.4; GRPO: 0.2; GSPO: 3e-4 / 4e-4).
DEMO_EPS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4)}
GMPO_EPS = (0.4, 0.4)

OUTLIER_FRACTION = 0.01  # share of valid tokens given an outlier log-ratio
OUTLIER_RANGE = (3.0, 8.0)  # |log-ratio| of an outlier: the token's probability changed by e^3..e^8
BULK_STD = 0.05  # log-ratio spread of ordinary tokens after one small update

COLUMNS = """\
columns:
  loss          the scalar loss (mean over sequences)
  grad_norm     L2 norm of d loss / d log_probs over the batch
  max|w|        largest per-token gradient weight: |d loss / d logp_t| relative to the on-policy |A_i| / |o_i|
                (GRPO: the token's own ratio; GMPO: its sequence's geometric-mean ratio; 1 = on-policy)
  seq_ratio     range of the (clipped) sequence ratio the loss multiplies each advantage by
  token_ratio   range of the unclipped token ratios pi_new / pi_old (the same for every loss)
  clip lo/hi    fraction of valid tokens (sequences for gspo and gmpo_seq_clip) whose one-sided clip is active"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="GMPO vs GRPO (and ablations) on synthetic outlier log-ratios")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    parser.add_argument("--batch", type=_positive_int, default=64, help="number of sequences")
    parser.add_argument("--length", type=_positive_int, default=256, help="padded response length")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON to PATH")
    parser.set_defaults(func=run)


def synthetic_batch(seed: int, batch: int, length: int):
    """(log_probs, old_log_probs, advantages (B,), mask (B, L)): small log-ratios plus ~1% outliers of 3-8 nats."""
    import torch

    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 2 - 0.05  # sampled tokens' log-probs under the old policy
    log_ratio = torch.randn(batch, length, generator=g) * BULK_STD
    outlier = torch.rand(batch, length, generator=g) < OUTLIER_FRACTION
    low, high = OUTLIER_RANGE
    magnitude = low + (high - low) * torch.rand(batch, length, generator=g)
    sign = torch.where(torch.rand(batch, length, generator=g) < 0.5, -1.0, 1.0)
    log_ratio = torch.where(outlier, sign * magnitude, log_ratio)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = (torch.rand(batch, generator=g) < 0.5).float()  # 1/0 verifiable reward
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return old + log_ratio, old, advantages, mask


def compare_losses(seed: int, batch: int, length: int) -> list[dict]:
    """One row per loss name: loss, gradient statistics and the loss's own metrics."""
    import torch

    from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss

    log_probs, old, advantages, mask = synthetic_batch(seed, batch, length)
    lengths = mask.sum(-1, keepdim=True).float()
    n_valid = int((lengths > 0).sum())
    # On-policy gradient of the mean-over-sequences objective: -A_i / |o_i| / n_valid for each token of sequence i.
    on_policy = (advantages.abs().unsqueeze(-1) / lengths.clamp(min=1) / n_valid).expand_as(mask)
    weighted = mask & (on_policy > 0)

    rows = []
    for name in sorted(LOSS_NAMES, key=lambda n: (not n.startswith("gmpo"), n)):
        eps_low, eps_high = DEMO_EPS.get(name, GMPO_EPS)
        leaf = log_probs.clone().requires_grad_(True)
        loss, metrics = compute_policy_loss(
            name, leaf, old, advantages, mask, clip_eps_low=eps_low, clip_eps_high=eps_high
        )
        (grad,) = torch.autograd.grad(loss, leaf)
        weight = torch.where(weighted, grad.abs() / on_policy, 0.0)
        rows.append(
            {
                "loss": name,
                "eps_low": eps_low,
                "eps_high": eps_high,
                "value": loss.item(),
                "grad_norm": grad.norm().item(),
                "max_token_weight": weight.max().item(),
                **{key: value.item() for key, value in metrics.items()},
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'loss':<14}{'eps':>15}{'loss':>12}{'grad_norm':>11}{'max|w|':>11}"
        f"{'seq_ratio':>22}{'token_ratio':>22}{'clip lo/hi':>14}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        eps = f"{r['eps_low']:g}/{r['eps_high']:g}"
        seq = f"[{r['seq_ratio_min']:.3g}, {r['seq_ratio_max']:.3g}]"
        tok = f"[{r['token_ratio_min']:.3g}, {r['token_ratio_max']:.3g}]"
        clip = f"{r['clip_frac_low']:.3f}/{r['clip_frac_high']:.3f}"
        lines.append(
            f"{r['loss']:<14}{eps:>15}{r['value']:>12.4g}{r['grad_norm']:>11.4g}{r['max_token_weight']:>11.4g}"
            f"{seq:>22}{tok:>22}{clip:>14}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = compare_losses(args.seed, args.batch, args.length)
    low, high = OUTLIER_RANGE
    print(
        f"{args.batch} sequences x {args.length} tokens, seed {args.seed}: log-ratios ~ N(0, {BULK_STD}^2), "
        f"{OUTLIER_FRACTION:.0%} of tokens outliers with |log-ratio| in [{low:g}, {high:g}] "
        f"(ratios up to e^{high:g} = {math.exp(high):.0f})\n"
    )
    print(format_table(rows))
    print("\n" + COLUMNS)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"seed": args.seed, "batch": args.batch, "length": args.length, "rows": rows}, indent=2)
        )
        print(f"\nwrote {args.json}")
    return 0
