"""The policy actor that OpenRLHF's train_ppo_ray launches when the loss is one of ours.

The loss must be replaced where OpenRLHF builds it: inside the policy actor's Ray worker process (a patch made in
the driver never reaches it). Ray forbids subclassing a `@ray.remote` class, so we subclass the plain class behind
it (`__ray_actor_class__`) and wrap the subclass with `ray.remote` again. Ray pickles the class by reference, so
`openrlhf_gmpo` must be importable on every node (see docs/openrlhf.md, "runtime_env").
"""

import ray
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

from openrlhf_gmpo.openrlhf_plugin.loss_adapter import install_policy_loss


class _GMPOPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's PolicyModelActor, whose trainer computes the policy loss with openrlhf_gmpo.losses."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        install_policy_loss(self.trainer)


# Same resource request as OpenRLHF's `@ray.remote(num_gpus=1)`; RayActorGroup overrides it with .options().
GMPOPolicyModelActor = ray.remote(num_gpus=1)(_GMPOPolicyModelActor)
