"""The patched policy actor on a real local Ray cluster: inside its worker process the policy loss is ours."""

import os

import helpers_plugin
import ray
import torch

from openrlhf_gmpo.losses import compute_policy_loss


def test_policy_actor_worker_uses_our_loss(local_ray):
    from openrlhf_gmpo.openrlhf_plugin.actor import GMPOPolicyModelActor

    plan = helpers_plugin.dry_run("--preset", os.path.join(helpers_plugin.ROOT, "configs", "countdown_200m_gmpo.yaml"))
    inputs = helpers_plugin.loss_inputs(seed=3)
    # OpenRLHF's RayActorGroup creates it with (world_size, rank, master_addr, master_port); no GPU here.
    actor = GMPOPolicyModelActor.options(num_gpus=0, num_cpus=1).remote(1, 0, None, None)
    report = ray.get(actor.__ray_call__.remote(helpers_plugin.probe_policy_loss, plan.args, inputs), timeout=240)

    assert report["pid"] != os.getpid()  # a separate worker process
    # Ray wraps the class in a same-named subclass, so look for ours before OpenRLHF's in the MRO.
    mro = report["actor_class"]
    ours = mro.index("openrlhf_gmpo.openrlhf_plugin.actor._GMPOPolicyModelActor")
    assert ours < mro.index("openrlhf.trainer.ray.ppo_actor.PolicyModelActor")
    assert report["imported_openrlhf_ray"]  # the worker imported OpenRLHF's real Ray actor stack
    assert report["loss_class"] == "openrlhf_gmpo.openrlhf_plugin.loss_adapter.OpenRLHFPolicyLoss"
    assert report["num_outputs"] == 5  # the 0.11.2 contract, probed in the worker
    expected, _ = compute_policy_loss("gmpo", **inputs, clip_eps_low=0.4, clip_eps_high=0.4)  # the preset's clip
    torch.testing.assert_close(report["loss"], expected, rtol=0, atol=0)
    ray.kill(actor)
