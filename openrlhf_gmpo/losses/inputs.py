"""Validation and fp32 preparation of a policy-loss batch, shared by every registered loss.

All data checks that need to look at tensor values are gathered into one device->host copy, so a GPU caller pays a
single synchronisation per call rather than one per check.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

# Log-ratios are clamped to +-LOG_RATIO_LIMIT before any exp, for every loss (no_clip and grpo included): e^20 ~ 4.9e8
# keeps ratios, losses and gradients finite in fp32 even for log-ratios of +-1e4 (a bf16 outlier or a broken rollout).
# The clamp has zero gradient outside the band, so such a token stops contributing rather than exploding.
LOG_RATIO_LIMIT = 20.0

# Per-token advantages must be constant over a sequence's valid tokens (they are one value broadcast by the trainer).
ADVANTAGE_ATOL = 1e-6
ADVANTAGE_RTOL = 1e-5


@dataclass(frozen=True)
class SequenceBatch:
    """A validated batch in fp32. B sequences, L padded positions."""

    log_ratio: torch.Tensor  # (B, L) logp - logp_old, 0 at masked positions, clamped to +-LOG_RATIO_LIMIT
    mask: torch.Tensor  # (B, L) bool, True at valid (response) tokens
    advantages: torch.Tensor  # (B,) one advantage per sequence, 0 for sequences without valid tokens
    lengths: torch.Tensor  # (B,) fp32 number of valid tokens |o_i|

    @property
    def valid_seq(self) -> torch.Tensor:
        return self.lengths > 0  # (B,) sequences with at least one valid token

    @property
    def safe_lengths(self) -> torch.Tensor:
        return self.lengths.clamp(min=1.0)  # (B,) divisor that is never 0 (all-masked sequences are excluded later)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_dp_size(dp_size) -> int:
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
    return dp_size


def _check_tensor(name: str, value, shape: torch.Size | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (the shape of log_probs)")
    return value


def _global_batch_size_tensor(global_batch_size, device) -> torch.Tensor | None:
    """OpenRLHF passes a 0-d fp32 tensor (see openrlhf/utils/loss_utils.py); plain numbers are accepted too."""
    if global_batch_size is None:
        return None
    if isinstance(global_batch_size, torch.Tensor):
        if global_batch_size.numel() != 1:
            raise ValueError(f"global_batch_size must be a number or a 1-element tensor, got {global_batch_size}")
        return global_batch_size.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(check_positive("global_batch_size", global_batch_size), device=device)


# A fast check: (argument name, message, 0-d bool tensor that is True when the check fails, where), `where` giving
# the first offending entry in words, called only when the check failed. A message of None means "some valid entry
# is NaN/inf", located entry by entry (and named) only when the fast check fires.
Check = tuple[str, str | None, torch.Tensor, Callable[[], str] | None]


def _raise_first_failure(checks: list[Check]) -> bool:
    """Raise for the first failed check with a message; True if a check without one failed. One host sync."""
    flags = torch.stack([bad for _, _, bad, _ in checks]).tolist()
    for (name, message, _, where), bad in zip(checks, flags, strict=True):
        if bad and message is not None:
            raise ValueError(f"{name} {message}" + (f" ({where()})" if where is not None else ""))
    return any(bad for bad in flags)


def first_entry(bad: torch.Tensor, values: torch.Tensor) -> str:
    """'first at [row, column]: value' (or '[row]' for 1-D) for the first True entry of `bad`."""
    index = tuple(int(i) for i in bad.nonzero()[0])
    return f"first at {list(index)}: {values[index].item()!r}"


def _boolean_mask(action_mask: torch.Tensor, checks: list[Check]) -> torch.Tensor:
    if action_mask.dtype == torch.bool:
        return action_mask
    if action_mask.is_floating_point():
        bad_values = ((action_mask != 0) & (action_mask != 1)).any()
    else:  # OpenRLHF's action_mask is int64 0/1: one min/max pass suffices
        lowest, highest = torch.aminmax(action_mask)
        bad_values = (lowest < 0) | (highest > 1)
    where = lambda: first_entry((action_mask != 0) & (action_mask != 1), action_mask)  # noqa: E731
    checks.append(("action_mask", "must hold only 0/1 (boolean-like) values", bad_values, where))
    return action_mask != 0


def _sequence_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, valid_seq: torch.Tensor, checks: list[Check]
) -> torch.Tensor:
    """(B,) advantage per sequence, 0 where the sequence has no valid token; a (B, L) input must be constant."""
    adv = advantages.detach().float()
    if adv.dim() == 1:
        bad = valid_seq & ~adv.isfinite()
        checks.append(
            ("advantages", "has NaN/inf for a sequence with valid tokens", bad.any(), partial(first_entry, bad, adv))
        )
        return torch.where(valid_seq, adv, 0.0)
    lowest = torch.where(mask, adv, torch.inf).amin(dim=-1)  # (B,), NaN propagates
    highest = torch.where(mask, adv, -torch.inf).amax(dim=-1)
    spread = highest - lowest
    tol = ADVANTAGE_ATOL + ADVANTAGE_RTOL * lowest.abs()
    not_finite = lambda: first_entry(mask & ~adv.isfinite(), adv)  # noqa: E731
    checks.append(
        ("advantages", "has NaN/inf at a valid (unmasked) position", (valid_seq & ~spread.isfinite()).any(), not_finite)
    )
    varies = valid_seq & (spread > tol)

    def which_row() -> str:
        row = int(varies.nonzero()[0])
        return f"first in row {row}: from {lowest[row].item()!r} to {highest[row].item()!r}"

    checks.append(("advantages", "must be constant over each sequence's valid tokens", varies.any(), which_row))
    return torch.where(valid_seq, lowest, 0.0)


def _check_shapes(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs) -> None:
    _check_tensor("log_probs", log_probs)
    if log_probs.dim() != 2 or log_probs.numel() == 0:
        raise ValueError(f"log_probs must be a non-empty [B, L] tensor, got shape {tuple(log_probs.shape)}")
    shape = log_probs.shape
    _check_tensor("old_log_probs", old_log_probs, shape)
    _check_tensor("action_mask", action_mask, shape)
    if rollout_log_probs is not None:
        _check_tensor("rollout_log_probs", rollout_log_probs, shape)
    _check_tensor("advantages", advantages)
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B] or [B, L] = {tuple(shape)}")


def prepare_batch(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
    global_batch_size,
) -> tuple[SequenceBatch, torch.Tensor | None, torch.Tensor | None]:
    """Validate the inputs and return (batch, rollout_log_ratio (B, L) or None, global_batch_size 0-d tensor or None).

    rollout_log_ratio is old_log_probs - rollout_log_probs (detached, 0 at masked positions, clamped like log_ratio).
    Raises ValueError naming the argument on a shape mismatch, a non-boolean-like mask, NaN/inf at a valid position,
    advantages that vary within a sequence, or a non-positive global_batch_size.
    """
    _check_shapes(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs)
    checks: list[Check] = []
    mask = _boolean_mask(action_mask, checks)
    lengths = mask.sum(dim=-1, dtype=torch.float32)  # (B,)

    # torch.where (never a multiply) so NaN/inf at masked positions never reach the loss or its gradient.
    # A masked sum is finite iff every valid entry is (bar an overflow of huge finite values, which the entry-by-entry
    # pass below then clears), so finiteness costs one reduction on the fast path.
    masked_diff = torch.where(mask, log_probs.float() - old_log_probs.detach().float(), 0.0)  # (B, L)
    checks.append(("log_probs", None, ~masked_diff.detach().sum().isfinite(), None))
    seq_adv = _sequence_advantages(advantages, mask, lengths > 0, checks)

    rollout_log_ratio = None
    if rollout_log_probs is not None:
        rollout_diff = torch.where(mask, old_log_probs.detach().float() - rollout_log_probs.detach().float(), 0.0)
        checks.append(("rollout_log_probs", None, ~rollout_diff.sum().isfinite(), None))
        rollout_log_ratio = rollout_diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)

    gbs = _global_batch_size_tensor(global_batch_size, log_probs.device)
    if isinstance(global_batch_size, torch.Tensor):
        where = lambda: f"got {gbs.item()!r}"  # noqa: E731
        checks.append(("global_batch_size", "must be finite and > 0", ~(gbs > 0) | ~gbs.isfinite(), where))

    if _raise_first_failure(checks):  # rare: a masked sum is not finite; locate the NaN/inf and name its argument
        located = []
        for name, t in (
            ("log_probs", log_probs),
            ("old_log_probs", old_log_probs),
            ("rollout_log_probs", rollout_log_probs),
        ):
            if t is not None:
                bad = mask & ~t.detach().isfinite()
                where = partial(first_entry, bad, t.detach())
                located.append((name, "has NaN/inf at a valid (unmasked) position", bad.any(), where))
        _raise_first_failure(located)

    log_ratio = masked_diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return SequenceBatch(log_ratio, mask, seq_adv, lengths), rollout_log_ratio, gbs
