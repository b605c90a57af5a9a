"""The policy-loss registry: one decorator maps a name to a pure per-sequence loss function.

A registered function receives a validated `SequenceBatch` (fp32, masked, safety-clamped log-ratios) and the two clip
bounds, and returns `PolicyLossTerms`. Everything shared by all losses (validation, reduction over the batch, the
rollout importance-sampling correction, metrics) lives in `compute_policy_loss`, so a new loss is one small function:

    @register_loss("my_loss")
    def my_loss(batch: SequenceBatch, *, eps_low: float, eps_high: float) -> PolicyLossTerms: ...
"""

from collections.abc import Callable
from typing import NamedTuple

import torch


class PolicyLossTerms(NamedTuple):
    """What a loss function returns; B is the number of sequences.

    Clipping is reported per sequence so the metrics need no further pass over (B, L) tensors: for token-level
    clipping the number of the sequence's valid tokens whose clip is active, for sequence-level clipping 1.0 where
    the sequence's own clip is active. Counts are one-sided: low only where A < 0, high only where A > 0.
    """

    seq_loss: torch.Tensor  # (B,) per-sequence loss, differentiable; ignored where the sequence has no valid token
    seq_ratio: torch.Tensor  # (B,) detached: the (clipped) sequence-level ratio the loss multiplies the advantage by
    clipped_low: torch.Tensor  # (B,) fp32 count (token level) or 0/1 flag (sequence level)
    clipped_high: torch.Tensor  # (B,) same
    clip_level: str  # "token" or "sequence"


LossFn = Callable[..., PolicyLossTerms]
_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering `fn(batch, *, eps_low, eps_high) -> PolicyLossTerms` under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_loss: name must be a non-empty string, got {name!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(
                f"register_loss: a loss named {name!r} is already registered ({_LOSSES[name].__qualname__})"
            )
        _LOSSES[name] = fn
        return fn

    return decorator


def get_loss(name: str) -> LossFn:
    if name not in _LOSSES:
        raise ValueError(f"name: unknown policy loss {name!r}; known losses: {', '.join(_LOSSES)}")
    return _LOSSES[name]


def registered_names() -> tuple[str, ...]:
    return tuple(_LOSSES)


def clip_level(name: str) -> str:
    """What the loss's clip fractions count, "token" or "sequence", as the loss itself reports it (a 1-token call)."""
    from openrlhf_gmpo.losses.inputs import SequenceBatch

    one = torch.ones(1)
    batch = SequenceBatch(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), one, one)
    return get_loss(name)(batch, eps_low=0.2, eps_high=0.2).clip_level
