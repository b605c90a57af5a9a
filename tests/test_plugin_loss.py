"""The PolicyLoss adapter inside OpenRLHF's actor path: same call, same tuple, our loss and metrics."""

import functools
import math
import os
import re
import sys

import helpers_plugin
import pytest
import torch
from openrlhf.models import Actor
from openrlhf.utils.loss_utils import get_loss_batch_info

from openrlhf_gmpo.losses import compute_policy_loss
from openrlhf_gmpo.openrlhf_plugin import loss_adapter
from openrlhf_gmpo.openrlhf_plugin.launch import policy_actor_class
from openrlhf_gmpo.openrlhf_plugin.version import check_openrlhf_version


def test_installed_contract_is_the_0_11_2_five_tuple():
    # OpenRLHF 0.11.2 returns (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio); asking the class itself says 5.
    loss_adapter.check_installed_policy_loss()  # raises unless the installed PolicyLoss has the 0.11.2 contract
    assert check_openrlhf_version() == "0.11.2"


def test_loss_on_openrlhf_actor_log_probs_equals_compute_policy_loss(tmp_path, monkeypatch):
    # OpenRLHF's log_probs_from_logits first tries flash-attn's Triton cross-entropy and only falls back to its own
    # torch path on ImportError; the Triton kernel fails on CPU tensors (FACTS.md), so make it unimportable here.
    monkeypatch.setitem(sys.modules, "flash_attn.ops.triton.cross_entropy", None)
    actor = Actor(helpers_plugin.save_tiny_qwen3_moe(tmp_path / "moe"), attn_implementation="eager", param_dtype="bf16")
    torch.manual_seed(1)
    sequences = torch.randint(2, 64, (3, 10))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    action_mask = torch.ones(3, 6, dtype=torch.bool)
    action_mask[0, 4:] = False  # a shorter response
    log_probs = actor(sequences, action_mask, attention_mask)
    assert log_probs.shape == (3, 6) and log_probs.requires_grad

    old = (log_probs.detach() + 0.2 * torch.randn(3, 6)).float()
    advantages = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 6)  # per-token, as OpenRLHF passes them
    plan = helpers_plugin.dry_run("--preset", os.path.join(helpers_plugin.ROOT, "configs", "qwen2.5-math-7b_gmpo.yaml"))
    trainer = helpers_plugin.trainer_for(plan.args)
    installed = loss_adapter.install_policy_loss(trainer)
    assert trainer.actor_loss_fn is installed and installed.registry_name == "gmpo"

    # Exactly the call ActorPPOTrainer.training_step makes, with OpenRLHF's own normalisers.
    batch_info = get_loss_batch_info(None, action_mask)
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = trainer.actor_loss_fn(
        log_probs, old, advantages, action_mask=action_mask, rollout_log_probs=None, **batch_info
    )
    (grad_plugin,) = torch.autograd.grad(loss, log_probs, retain_graph=True)
    expected, metrics = compute_policy_loss(
        "gmpo", log_probs, old, advantages, action_mask, clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=3
    )
    (grad_expected,) = torch.autograd.grad(expected, log_probs)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad_plugin, grad_expected, rtol=0, atol=0)
    assert clip_ratio == metrics["clip_frac_low"] + metrics["clip_frac_high"]
    assert ppo_kl == metrics["approx_kl"]
    assert vllm_kl is None and is_filter_ratio is None  # no rollout correction: OpenRLHF then logs neither


def test_rollout_log_probs_enable_the_truncated_importance_weight():
    inputs = helpers_plugin.loss_inputs()
    # Rollout log-probs 0.1 below old on every token: per-sequence weight e^0.1 (under the cap 5), and vllm_kl, the
    # mean of rollout - old over valid tokens, is -0.1.
    rollout = inputs["old_log_probs"] - 0.1
    adapter = loss_adapter.OpenRLHFPolicyLoss("gmpo", 0.4, 0.4, rollout_is_cap=5.0)
    loss, _, _, vllm_kl, is_filter_ratio = adapter(**inputs, rollout_log_probs=rollout)
    expected, _ = compute_policy_loss(
        "gmpo", **inputs, clip_eps_low=0.4, clip_eps_high=0.4, rollout_log_probs=rollout, rollout_is_cap=5.0
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(vllm_kl, torch.tensor(-0.1))
    assert is_filter_ratio == 0.0  # e^0.1 < 5: no sequence hits the cap
    assert adapter.last_metrics["rollout_is_weight_mean"] == pytest.approx(torch.exp(torch.tensor(0.1)).item())

    # Cap 1.05 < e^0.1 = 1.105: every one of the 3 sequences is truncated.
    _, _, _, _, is_filter_ratio = loss_adapter.OpenRLHFPolicyLoss("gmpo", 0.4, 0.4, rollout_is_cap=1.05)(
        **inputs, rollout_log_probs=rollout
    )
    assert is_filter_ratio == 1.0


def test_gspo_ours_runs_our_gspo_and_native_names_stay_openrlhf():
    assert loss_adapter.CLI_TO_REGISTRY["gspo_ours"] == "gspo"
    assert "gspo" not in loss_adapter.OUR_LOSS_TYPES and "ppo" not in loss_adapter.OUR_LOSS_TYPES
    inputs = helpers_plugin.loss_inputs()
    loss = loss_adapter.OpenRLHFPolicyLoss("gspo_ours", 3e-4, 4e-4)(**inputs)[0]
    expected, _ = compute_policy_loss("gspo", **inputs, clip_eps_low=3e-4, clip_eps_high=4e-4)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="'ppo' is not one of our losses"):
        loss_adapter.OpenRLHFPolicyLoss("ppo", 0.2, 0.2)


def test_metrics_join_the_training_step_status_under_gmpo_prefix():
    # The dict shape ActorPPOTrainer.training_step returns; OpenRLHF weights 0-d tensors by tokens by default.
    status = {"metrics": {"policy_loss": torch.tensor(0.5)}, "weights": {"policy_loss": "token"}}
    inputs = helpers_plugin.loss_inputs()
    _, metrics = compute_policy_loss("gmpo", **inputs, clip_eps_low=0.4, clip_eps_high=0.4)
    loss_adapter.add_loss_metrics(status, metrics)
    assert status["metrics"]["policy_loss"] == 0.5
    assert status["metrics"]["gmpo/token_ratio_max"] == metrics["token_ratio_max"]
    assert status["weights"]["gmpo/token_ratio_max"] == "token"
    assert status["weights"]["gmpo/seq_ratio_min"] == "sample"  # sequence-level: averaged over sequences
    assert {f"gmpo/{key}" for key in metrics} <= set(status["metrics"])


def test_clip_fractions_of_sequence_level_losses_are_sample_weighted():
    from openrlhf_gmpo.losses.registry import clip_level

    # gspo and gmpo_seq_clip count clipped sequences, the others clipped tokens (what each loss reports).
    assert {name: clip_level(name) for name in ("gmpo", "gmpo_seq_clip", "gspo", "grpo")} == {
        "gmpo": "token", "gmpo_seq_clip": "sequence", "gspo": "sequence", "grpo": "token"
    }  # fmt: skip
    for sequence_clip, weight in ((True, "sample"), (False, "token")):
        # OpenRLHF's training_step status: its ppo_clip_ratio (our clip fractions' sum) is a 0-d tensor, token-weighted
        status = {"metrics": {"ppo_clip_ratio": torch.tensor(0.25)}, "weights": {"ppo_clip_ratio": "token"}}
        _, metrics = compute_policy_loss("gspo", **helpers_plugin.loss_inputs(), clip_eps_low=0.2, clip_eps_high=0.2)
        loss_adapter.add_loss_metrics(status, metrics, sequence_clip)
        assert status["weights"]["gmpo/clip_frac_low"] == status["weights"]["gmpo/clip_frac_high"] == weight
        assert status["weights"]["ppo_clip_ratio"] == weight


def test_policy_actor_class_per_loss_and_backend():
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    from openrlhf_gmpo.openrlhf_plugin.actor import GMPOPolicyModelActor, _GMPOPolicyModelActor

    gmpo = helpers_plugin.dry_run(
        "--actor.policy_loss_type", "gmpo", "--actor.model_name_or_path", "m", "--reward.remote_url", "r.py",
        *helpers_plugin.SEQUENCE_ADVANTAGES,
    )  # fmt: skip
    ppo = helpers_plugin.dry_run("--actor.model_name_or_path", "m", "--reward.remote_url", "r.py")
    assert policy_actor_class(gmpo.args, "deepspeed") is GMPOPolicyModelActor
    assert policy_actor_class(ppo.args, "deepspeed") is PolicyModelActor  # OpenRLHF's own losses: untouched
    assert issubclass(_GMPOPolicyModelActor, PolicyModelActor.__ray_actor_class__)

    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    megatron = policy_actor_class(gmpo.args, "megatron")
    assert megatron.__ray_actor_class__ is MegatronPolicyActor  # wrapped with ray.remote for RayActorGroup


@pytest.mark.parametrize("installed", ["0.11.1", "0.11.0", "0.12.0"])
def test_version_check_refuses_every_other_release(monkeypatch, installed):
    from openrlhf_gmpo.openrlhf_plugin import version

    # 0.11.0 and 0.11.1 parse other flags and return a 4-tuple: the same series is not enough.
    monkeypatch.setattr(version, "version", lambda name: installed)
    message = rf"installed openrlhf is {re.escape(installed)}, but this plugin supports only openrlhf 0\.11\.2"
    with pytest.raises(SystemExit, match=message):
        version.check_openrlhf_version()


@pytest.mark.parametrize(("level", "cap"), [("off", None), ("seq", 5.0)])
def test_loss_is_built_from_openrlhf_args_low_high_and_the_upper_threshold(level, cap):
    # Asymmetric bounds and thresholds, parsed by OpenRLHF's own parser: low stays low, and the rollout weight cap
    # is the upper threshold (5.0, not 0.5), set only when the correction is on.
    args = helpers_plugin.dry_run(
        "--actor.policy_loss_type", "gmpo", "--actor.eps_clip_low_high", "0.2", "0.3",
        *helpers_plugin.SEQUENCE_ADVANTAGES,
        "--algo.advantage.is_correction_level", level, "--algo.advantage.is_correction_threshold", "0.5", "5.0",
    ).args  # fmt: skip
    adapter = loss_adapter.OpenRLHFPolicyLoss.from_args(args)
    assert (adapter.clip_eps_low, adapter.clip_eps_high, adapter.rollout_is_cap) == (0.2, 0.3, cap)


def test_capped_share_compares_each_sequence_mean_and_counts_only_valid_sequences():
    # logp_old - logp_rollout = 0.1 on every token: each sequence's log-weight is the mean, 0.1 (its sum would be
    # 0.4). Row 2 has no valid token and is not a sequence.
    old = torch.zeros(3, 4)
    rollout = torch.full((3, 4), -0.1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    vllm_kl, share = loss_adapter._rollout_mismatch(old, rollout, mask, cap=math.exp(0.2))
    assert share.item() == 0.0  # 0.1 < 0.2: neither sequence capped
    assert vllm_kl.item() == pytest.approx(-0.1)
    _, share = loss_adapter._rollout_mismatch(old, rollout, mask, cap=math.exp(0.05))
    assert share.item() == 1.0  # both valid sequences capped: 2 of 2, not 2 of 3


def test_installed_gspo_ours_reports_sample_weighted_clip_fractions():
    # install_policy_loss wraps the trainer's training_step; for a loss that clips whole sequences the clip
    # fractions it adds count sequences. Here the wrapped step is OpenRLHF's status dict, as training_step returns it.
    args = helpers_plugin.dry_run(
        "--actor.policy_loss_type", "gspo_ours", "--actor.eps_clip_low_high", "3e-4", "4e-4",
        *helpers_plugin.SEQUENCE_ADVANTAGES,
    ).args  # fmt: skip
    trainer = helpers_plugin.trainer_for(args)
    trainer.training_step = lambda: {"metrics": {"policy_loss": torch.tensor(0.5)}, "weights": {}}
    installed = loss_adapter.install_policy_loss(trainer)
    installed(**helpers_plugin.loss_inputs())  # the step's loss call, which leaves its metrics behind
    status = trainer.training_step()
    assert status["weights"]["gmpo/clip_frac_low"] == status["weights"]["gmpo/clip_frac_high"] == "sample"


def test_loss_without_an_action_mask_counts_every_token():
    inputs = helpers_plugin.loss_inputs()
    del inputs["action_mask"]
    loss = loss_adapter.OpenRLHFPolicyLoss("gmpo", 0.4, 0.4)(**inputs)[0]
    full = torch.ones_like(inputs["log_probs"], dtype=torch.bool)
    expected, _ = compute_policy_loss("gmpo", **inputs, action_mask=full, clip_eps_low=0.4, clip_eps_high=0.4)
    torch.testing.assert_close(loss, expected)


def test_a_policy_loss_with_another_tuple_is_refused(monkeypatch):
    # An OpenRLHF build whose PolicyLoss has 0.11.2's signature but returns 4 values (as 0.11.0 did): the install
    # check calls it and refuses, before any training step.
    from openrlhf.models import PolicyLoss

    forward = PolicyLoss.forward

    @functools.wraps(forward)  # the signature check sees 0.11.2's parameters
    def four_values(self, *args, **kwargs):
        return forward(self, *args, **kwargs)[:4]

    plan = helpers_plugin.dry_run("--preset", os.path.join(helpers_plugin.ROOT, "configs", "qwen2.5-math-7b_gmpo.yaml"))
    trainer = helpers_plugin.trainer_for(plan.args)
    monkeypatch.setattr(PolicyLoss, "forward", four_values)
    with pytest.raises(RuntimeError, match="returns 4 values; the adapter handles"):
        loss_adapter.install_policy_loss(trainer)
