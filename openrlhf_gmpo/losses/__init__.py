"""The policy-loss family: GMPO, its paper ablations and the GRPO/GSPO baselines behind one registry.

from openrlhf_gmpo.losses import compute_policy_loss, LOSS_NAMES, register_loss
loss, metrics = compute_policy_loss("gmpo", log_probs, old_log_probs, advantages, action_mask,
                                    clip_eps_low=0.4, clip_eps_high=0.4)
"""

from openrlhf_gmpo.losses import baselines, gmpo  # noqa: F401  (importing registers the built-in losses)
from openrlhf_gmpo.losses.api import compute_policy_loss
from openrlhf_gmpo.losses.inputs import LOG_RATIO_LIMIT, SequenceBatch
from openrlhf_gmpo.losses.registry import PolicyLossTerms, register_loss, registered_names

# The built-in names, fixed at import; a loss registered later is still accepted by compute_policy_loss
# (see registered_names()).
LOSS_NAMES: tuple[str, ...] = registered_names()

__all__ = [
    "LOG_RATIO_LIMIT",
    "LOSS_NAMES",
    "PolicyLossTerms",
    "SequenceBatch",
    "compute_policy_loss",
    "register_loss",
    "registered_names",
]
