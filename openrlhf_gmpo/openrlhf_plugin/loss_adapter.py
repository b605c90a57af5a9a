"""Our policy-loss family behind OpenRLHF's `PolicyLoss` contract, and its installation into an actor trainer.

OpenRLHF's `ActorPPOTrainer` builds `self.actor_loss_fn = PolicyLoss(...)` and calls it as

    actor_loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = self.actor_loss_fn(
        action_log_probs, old_action_log_probs, advantages, action_mask=..., rollout_log_probs=..., **loss_batch_info)

with `loss_batch_info = {dp_size, batch_num_tokens, global_batch_size}`. `OpenRLHFPolicyLoss` accepts exactly that
call and returns the same 5-tuple, computed by `openrlhf_gmpo.losses.compute_policy_loss`.
"""

import inspect
import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss
from openrlhf_gmpo.losses.registry import clip_level

# OpenRLHF's own loss types, served unchanged by its PolicyLoss. On a name clash OpenRLHF's meaning wins, so an
# existing OpenRLHF script behaves the same under our launcher; our loss of that name gets the suffix "_ours".
NATIVE_LOSS_TYPES = ("ppo", "gspo")
CLI_TO_REGISTRY = {(f"{name}_ours" if name in NATIVE_LOSS_TYPES else name): name for name in LOSS_NAMES}
OUR_LOSS_TYPES = tuple(CLI_TO_REGISTRY)

# The keyword arguments the adapter's forward handles; the installed PolicyLoss.forward must take exactly these.
FORWARD_PARAMETERS = (
    "log_probs",
    "old_log_probs",
    "advantages",
    "action_mask",
    "rollout_log_probs",
    "dp_size",
    "batch_num_tokens",
    "global_batch_size",
)

NUM_OUTPUTS = 5  # (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)

# Metric names under which our diagnostics reach OpenRLHF's loggers (logged as train/gmpo/<key>), and how OpenRLHF
# averages each over micro-batches and DP ranks ("token" or "sample" weighted; it has no min/max reduction, so a
# logged *_min/*_max is the weighted mean of per-micro-batch extrema).
METRIC_PREFIX = "gmpo/"
SAMPLE_WEIGHTED_METRICS = ("seq_ratio_min", "seq_ratio_max", "seq_clip_frac", "rollout_is_weight_mean")
SEQUENCE_CLIP_METRICS = ("clip_frac_low", "clip_frac_high")  # sample-weighted for losses that clip whole sequences


def check_installed_policy_loss() -> None:
    """Refuse an installed PolicyLoss whose call or 5-tuple differs from what the adapter implements.

    The version check has already passed; this asks the installed class itself (signature, and the length of the
    tuple from a one-token batch), so a patched or rebuilt OpenRLHF fails here and not mid-training.
    """
    from openrlhf.models import PolicyLoss

    names = tuple(inspect.signature(PolicyLoss.forward).parameters)[1:]
    one = torch.zeros(1, 1)
    returned = len(PolicyLoss()(one, one, one, action_mask=torch.ones(1, 1))) if names == FORWARD_PARAMETERS else None
    if names != FORWARD_PARAMETERS or returned != NUM_OUTPUTS:
        raise RuntimeError(
            f"openrlhf_gmpo: installed PolicyLoss.forward takes {names} and returns {returned} values; the adapter "
            f"handles {FORWARD_PARAMETERS} and {NUM_OUTPUTS} (OpenRLHF 0.11.2); this OpenRLHF build is not supported"
        )


class OpenRLHFPolicyLoss(nn.Module):
    """Drop-in replacement for OpenRLHF's PolicyLoss that computes the loss with `compute_policy_loss`.

    OpenRLHF's outputs are filled from our metrics: clip_ratio = clip_frac_low + clip_frac_high, ppo_kl = approx_kl
    (k3 estimate of KL(old || new)). With a rollout cap, OpenRLHF's rollout log-probs enable the per-sequence
    truncated importance weight of compute_policy_loss; vllm_kl is then mean(logp_rollout - logp_old) over valid
    tokens (as OpenRLHF logs it) and is_filter_ratio the fraction of sequences whose weight hit the cap.
    `last_metrics` keeps the full metric dict of the latest call for the trainer hook to log.
    """

    def __init__(
        self,
        loss_type: str,
        clip_eps_low: float,
        clip_eps_high: float,
        rollout_is_cap: float | None = None,
    ):
        super().__init__()
        if loss_type not in CLI_TO_REGISTRY:
            raise ValueError(f"loss_type: {loss_type!r} is not one of our losses {OUR_LOSS_TYPES}")
        self.loss_type = loss_type
        self.registry_name = CLI_TO_REGISTRY[loss_type]
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.rollout_is_cap = rollout_is_cap
        self.last_metrics: dict[str, torch.Tensor] = {}

    @classmethod
    def from_args(cls, args) -> "OpenRLHFPolicyLoss":
        """Build from OpenRLHF's hierarchized args, the same fields OpenRLHF's PolicyLoss is built from."""
        low, high = args.actor.eps_clip_low_high
        correction = args.algo.advantage.is_correction_level != "off"
        cap = args.algo.advantage.is_correction_threshold[1] if correction else None
        return cls(args.actor.policy_loss_type, low, high, rollout_is_cap=cap)

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens=None,  # token-mean normaliser; our losses are per-sequence means (global_batch_size)
        global_batch_size=None,
    ) -> tuple:
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        use_rollout = self.rollout_is_cap is not None and rollout_log_probs is not None
        extra = {"rollout_log_probs": rollout_log_probs, "rollout_is_cap": self.rollout_is_cap} if use_rollout else {}
        loss, metrics = compute_policy_loss(
            self.registry_name,
            log_probs,
            old_log_probs,
            advantages,
            action_mask,
            clip_eps_low=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high,
            global_batch_size=global_batch_size,
            dp_size=dp_size,
            **extra,
        )
        self.last_metrics = metrics
        clip_ratio = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        vllm_kl = is_filter_ratio = None
        if use_rollout:
            vllm_kl, is_filter_ratio = _rollout_mismatch(
                old_log_probs, rollout_log_probs, action_mask, self.rollout_is_cap
            )
        return loss, clip_ratio, metrics["approx_kl"], vllm_kl, is_filter_ratio


@torch.no_grad()
def _rollout_mismatch(old_log_probs, rollout_log_probs, action_mask, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over valid tokens of logp_rollout - logp_old, fraction of sequences whose IS weight exceeds cap)."""
    mask = action_mask.bool()
    diff = torch.where(mask, rollout_log_probs.float() - old_log_probs.float(), 0.0)
    lengths = mask.sum(dim=-1)
    vllm_kl = diff.sum() / lengths.sum().clamp(min=1)
    seq_log_weight = -diff.sum(dim=-1) / lengths.clamp(min=1)  # mean(logp_old - logp_rollout) per sequence
    valid = lengths > 0
    capped = valid & (seq_log_weight > math.log(cap))
    return vllm_kl, capped.sum() / valid.sum().clamp(min=1)


def add_loss_metrics(status: dict, metrics: Mapping[str, torch.Tensor], sequence_clip: bool = False) -> dict:
    """Add our loss metrics to the status dict of ActorPPOTrainer.training_step, as `gmpo/<key>`.

    `status["metrics"]` / `status["weights"]` are what OpenRLHF's ppo_train reduces over micro-batches and DP ranks
    and returns from `fit`, and what PPOTrainer logs as train/<key> to TensorBoard and W&B. With `sequence_clip`
    (a loss that clips whole sequences) the clip fractions are fractions of sequences, so they are sample-weighted too.
    """
    sample_weighted = SAMPLE_WEIGHTED_METRICS + (SEQUENCE_CLIP_METRICS if sequence_clip else ())
    for key, value in metrics.items():
        name = METRIC_PREFIX + key
        status["metrics"][name] = value.detach()
        status["weights"][name] = "sample" if key in sample_weighted else "token"
    if sequence_clip and "ppo_clip_ratio" in status["weights"]:
        status["weights"]["ppo_clip_ratio"] = "sample"  # OpenRLHF's own clip ratio is our clip fractions' sum
    return status


def install_policy_loss(trainer) -> OpenRLHFPolicyLoss:
    """Replace an ActorPPOTrainer's actor_loss_fn with ours and make its training_step report our metrics.

    Called in the policy actor's Ray worker right after OpenRLHF built the trainer (and its own PolicyLoss, whose
    constructor still validates OpenRLHF's is_correction_* flags).
    """
    check_installed_policy_loss()
    loss_fn = OpenRLHFPolicyLoss.from_args(trainer.args)
    trainer.actor_loss_fn = loss_fn
    openrlhf_training_step = trainer.training_step

    sequence_clip = clip_level(loss_fn.registry_name) == "sequence"

    def training_step(*args, **kwargs):
        return add_loss_metrics(openrlhf_training_step(*args, **kwargs), loss_fn.last_metrics, sequence_clip)

    trainer.training_step = training_step
    return loss_fn
