"""`--megatron.*` flags through the real launcher (OpenRLHF's parser, dry run): what validate_megatron_args rejects."""

import helpers_plugin
import pytest

from openrlhf_gmpo.megatron.model import has_transformer_engine

BASE = (
    "--backend", "megatron", "--actor.model_name_or_path", "/nonexistent/model", "--actor.num_gpus_per_node", "8",
    "--actor.policy_loss_type", "gmpo", "--actor.eps_clip_low_high", "0.2", "0.2",
    "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
    "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "8",
    "--train.batch_size", "64", "--train.micro_batch_size", "2",
)  # fmt: skip


def with_local_model(path, *flags) -> list[str]:
    """BASE with --actor.model_name_or_path at a local model folder (whose config the launcher reads), plus flags."""
    base = list(BASE)
    base[base.index("/nonexistent/model")] = str(path)
    return [*base, *flags]


def test_qwen3_moe_layout_resolves_the_flags():
    args = helpers_plugin.dry_run(*BASE, "--megatron.ep", "8", "--megatron.routing_replay").args
    assert (args.megatron.tp, args.megatron.pp, args.megatron.ep, args.megatron.etp) == (1, 1, 8, 1)
    assert args.megatron.routing_replay is True
    assert (args.megatron.router_dtype, args.megatron.aux_loss_coef) == ("fp32", 0.0)  # RL defaults


def test_pipeline_stages_with_expert_parallelism_resolve():
    args = helpers_plugin.dry_run(*BASE, "--megatron.pp", "2", "--megatron.ep", "4", "--megatron.routing_replay").args
    assert (args.megatron.pp, args.megatron.ep, args.megatron.routing_replay) == (2, 4, True)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--megatron.ep", "3"), "8 GPUs are not divisible by tp*pp = 1 and etp*ep*pp = 3"),
        # 2 stages leave 8 / 2 = 4 data-parallel replicas: 36 / 4 = 9 samples do not make whole micro-batches of 2.
        (("--megatron.pp", "2", "--train.batch_size", "36"), "must split into 4 data-parallel ranks"),
        pytest.param(
            ("--megatron.tp", "2"),
            "--megatron.tp 2: training with tensor parallelism needs Transformer Engine",
            marks=pytest.mark.skipif(has_transformer_engine(), reason="Transformer Engine is installed here"),
        ),
        (("--ds.tensor_parallel_size", "2"), "must equal --megatron.tp 1"),
        (("--train.batch_size", "36"), "--train.batch_size 36: must split into 8 data-parallel ranks"),
        (("--vllm.sync_with_ray",), "--vllm.sync_with_ray True: not supported by the megatron backend"),
        (("--megatron.aux_loss_coef", "-1"), "--megatron.aux_loss_coef -1.0 must be >= 0"),
    ],
)
def test_unsupported_settings_exit_naming_the_flag(flags, message):
    with pytest.raises(SystemExit) as error:
        helpers_plugin.dry_run(*BASE, *flags)
    assert message in str(error.value)


def test_model_numbers_are_checked_at_launch_when_the_config_is_local(tmp_path):
    import helpers_megatron

    # The tiny test model has 4 experts: EP=8 cannot split them, and the launcher says so before any GPU work.
    helpers_megatron.tiny_hf_moe().config.save_pretrained(tmp_path)
    with pytest.raises(
        SystemExit, match=f"--actor.model_name_or_path {tmp_path}: .*4 experts are not divisible by ep=8"
    ):
        helpers_plugin.dry_run(*with_local_model(tmp_path, "--megatron.ep", "8"))


def test_an_architecture_the_backend_does_not_map_is_refused_at_launch(tmp_path):
    import helpers_megatron

    # YaRN rope scaling (Qwen3's long-context setting): megatron's plain RoPE would put positions elsewhere.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6}
    helpers_megatron.tiny_hf_moe(rope_parameters=yarn).config.save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=f"--actor.model_name_or_path {tmp_path}: rope_type='yarn' is not supported"):
        helpers_plugin.dry_run(*with_local_model(tmp_path))


def test_a_config_without_head_dim_passes_the_launch_check(tmp_path):
    import json

    import helpers_megatron

    # HF falls back to hidden_size // num_attention_heads (32 // 4 = 8, the tiny model's head_dim) when config.json
    # leaves head_dim out; the launcher's check must accept what HF accepts.
    helpers_megatron.tiny_hf_moe().config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert helpers_plugin.dry_run(*with_local_model(tmp_path)).args.actor.model_name_or_path == str(tmp_path)
