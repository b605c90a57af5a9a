"""Launch-time checks of the OpenRLHF plugin, through the real launcher's dry run: what our losses cannot honour is
refused before Ray starts, and what they can is accepted.

Each case was a change to the code that the rest of the suite let through (a mutation-testing pass in the seventh
session, docs/architecture.md): a validation or bookkeeping rule could have been dropped or loosened unnoticed.
"""

import os
import re

import helpers_plugin
import pytest

OURS = (
    "--actor.model_name_or_path", "m", "--reward.remote_url", "r.py", "--actor.policy_loss_type", "gmpo",
    *helpers_plugin.SEQUENCE_ADVANTAGES,
)  # fmt: skip


def test_colocated_vllm_engines_covering_more_gpus_than_the_actor_are_refused():
    # 6 engines x tp 3 = 18 vLLM GPUs vs 1 x 16 actor GPUs: not equal, refused (kills `!=` -> `>`).
    flags = ("--train.colocate_all", "--actor.num_gpus_per_node", "16", "--vllm.num_engines", "6",
             "--vllm.tensor_parallel_size", "3")  # fmt: skip
    with pytest.raises(SystemExit, match=re.escape("= 18, but --actor.num_nodes 1 x --actor.num_gpus_per_node 16")):
        helpers_plugin.dry_run(*OURS, *flags)


def test_colocated_gpu_count_includes_the_node_count():
    # 2 nodes x 8 GPUs = 16 = 4 engines x tp 4: accepted; 1 node would be 8 != 16 (kills dropping num_nodes).
    flags = ("--train.colocate_all", "--actor.num_nodes", "2", "--actor.num_gpus_per_node", "8",
             "--vllm.num_engines", "4", "--vllm.tensor_parallel_size", "4")  # fmt: skip
    plan = helpers_plugin.dry_run(*OURS, *flags)
    assert plan.args.actor.num_nodes == 2


def test_async_colocation_does_not_need_vllm_to_cover_the_actor_gpus():
    # OpenRLHF itself checks the count only without --train.async_enable: 16 actor GPUs, 15 vLLM GPUs accepted.
    flags = ("--train.colocate_all", "--train.async_enable", "--actor.num_gpus_per_node", "16",
             "--vllm.num_engines", "5", "--vllm.tensor_parallel_size", "3")  # fmt: skip
    assert helpers_plugin.dry_run(*OURS, *flags).args.train.async_enable is True


def test_kl_as_a_loss_is_allowed_with_our_losses():
    # init_coef 0.01 with --algo.kl.use_loss: the KL is a loss term, advantages stay per sequence: accepted.
    plan = helpers_plugin.dry_run(*OURS, "--algo.kl.init_coef", "0.01", "--algo.kl.use_loss")
    assert plan.args.algo.kl.use_loss is True and plan.args.algo.kl.init_coef == 0.01


def test_rollout_correction_gating_other_than_ratio_is_refused():
    # level seq with gating tv: our losses implement only the ratio gate, refused.
    flags = ("--algo.advantage.is_correction_level", "seq", "--algo.advantage.is_correction_gating", "tv")
    with pytest.raises(SystemExit, match="is_correction_gating tv: our losses support the rollout correction only"):
        helpers_plugin.dry_run(*OURS, *flags)


def test_input_template_with_a_lone_brace_is_refused():
    # "{} {" -> str.format raises ValueError (Single '{' encountered), not IndexError: must still be refused.
    with pytest.raises(SystemExit, match=r"--data.input_template .* fails here \(ValueError"):
        helpers_plugin.dry_run(*OURS, "--data.input_template", "{} {")


def test_reinforce_with_gamma_above_one_is_refused():
    # gamma 1.5 != 1 discounts (here: inflates) returns per token: refused like gamma 0.99 (kills `!= 1` -> `< 1`).
    with pytest.raises(SystemExit, match=re.escape("--algo.advantage.gamma 1.5: with reinforce")):
        helpers_plugin.dry_run(*OURS, "--algo.advantage.estimator", "reinforce", "--algo.advantage.gamma", "1.5")


def test_eps_clip_written_with_equals_still_overrides_the_presets_clip_pair():
    # `--actor.eps_clip=0.1` is the same flag as `--actor.eps_clip 0.1`: the preset's eps_clip_low_high must be
    # dropped, so OpenRLHF uses (0.1, 0.1) and not the preset's (0.2, 0.2).
    path = os.path.join(helpers_plugin.ROOT, "configs", "qwen3-30b-a3b_gmpo.yaml")
    plan = helpers_plugin.dry_run("--preset", path, "--actor.eps_clip=0.1")
    assert tuple(plan.args.actor.eps_clip_low_high) == (0.1, 0.1)


def test_help_is_not_a_preset_key(tmp_path):
    # `help: true` would print argparse's help and exit 0 instead of naming the bad key.
    path = tmp_path / "p.yaml"
    path.write_text("actor.model_name_or_path: m\nhelp: true\n")
    with pytest.raises(SystemExit) as error:
        helpers_plugin.dry_run("--preset", str(path))
    assert "unknown key 'help'" in str(error.value.code)
