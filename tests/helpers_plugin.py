"""Shared helpers of the OpenRLHF plugin tests: the launcher in dry-run mode, a tiny Qwen3-MoE, loss inputs."""

import glob
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
SCRIPTS = sorted(
    glob.glob(os.path.join(ROOT, "scripts", "dense", "*.sh")) + glob.glob(os.path.join(ROOT, "scripts", "moe", "*.sh"))
)
# The CountDown engineer's SFT script is not a preset launcher.
PRESET_SCRIPTS = [path for path in SCRIPTS if not path.endswith("countdown_200m_sft.sh")]
# One advantage per sequence, as our losses need: the launcher refuses OpenRLHF's defaults (gae, KL in the reward).
SEQUENCE_ADVANTAGES = (
    "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2", "--algo.kl.init_coef", "0",
)  # fmt: skip


def dry_run(*argv: str):
    """Run the launcher with --dry-run in this process; returns the LaunchPlan (plan.args: OpenRLHF's args)."""
    from openrlhf_gmpo.train_ppo_ray import main

    return main(["--dry-run", *argv])


def resolved(args, dotted: str):
    """args.a.b.c for "a.b.c" on OpenRLHF's hierarchized namespace."""
    value = args
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def save_tiny_qwen3_moe(path) -> str:
    """The megatron tests' 2-layer Qwen3-MoE (hidden 32, 4 experts, top-2), randomly initialised, saved as an HF
    checkpoint with special-token ids."""
    from helpers_megatron import TINY_MOE
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**TINY_MOE, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    Qwen3MoeForCausalLM(config).save_pretrained(str(path))
    return str(path)


def loss_inputs(batch: int = 3, length: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random log-probs near a reference policy, per-token advantages constant per sequence, a ragged mask."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator) * 2
    new = old + 0.3 * torch.randn(batch, length, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False  # sequence 0 has 3 valid tokens
    advantages = torch.tensor([1.0, -0.5, 2.0][:batch]).unsqueeze(-1).expand(batch, length).clone()
    return {"log_probs": new, "old_log_probs": old, "advantages": advantages, "action_mask": mask}


def trainer_for(args):
    """An ActorPPOTrainer holding OpenRLHF's own PolicyLoss, as its __init__ builds it from args.

    The real __init__ ends in torch.distributed.barrier + torch.cuda.synchronize, so on CPU we create the object
    without it and set the two attributes install_policy_loss reads and replaces: args and actor_loss_fn.
    """
    from openrlhf.models import PolicyLoss
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    trainer = ActorPPOTrainer.__new__(ActorPPOTrainer)
    trainer.args = args
    trainer.actor_loss_fn = PolicyLoss(
        clip_eps_low=args.actor.eps_clip_low_high[0],
        clip_eps_high=args.actor.eps_clip_low_high[1],
        policy_loss_type=args.actor.policy_loss_type,
    )
    return trainer


def probe_policy_loss(actor, args, inputs: dict) -> dict:
    """Run inside a policy actor's Ray worker (via actor.__ray_call__): install the loss into an ActorPPOTrainer as
    the actor's init_model_from_pretrained does, call it as training_step does, and report what ran where."""
    from openrlhf_gmpo.openrlhf_plugin.loss_adapter import install_policy_loss

    trainer = trainer_for(args)
    install_policy_loss(trainer)
    outputs = trainer.actor_loss_fn(**inputs)
    return {
        "pid": os.getpid(),
        "actor_class": [cls.__module__ + "." + cls.__qualname__ for cls in type(actor).__mro__],
        "loss_class": type(trainer.actor_loss_fn).__module__ + "." + type(trainer.actor_loss_fn).__qualname__,
        "num_outputs": len(outputs),
        "loss": outputs[0].detach(),
        "imported_openrlhf_ray": "openrlhf.trainer.ray.ppo_actor" in sys.modules,
    }
