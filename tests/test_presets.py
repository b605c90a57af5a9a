"""Every preset through OpenRLHF's real parser and validation (training start intercepted), and bad presets."""

import os
from pathlib import Path

import helpers_plugin
import pytest
import yaml

PRESET_IDS = [os.path.basename(path) for path in helpers_plugin.PRESETS]
MATH_REWARD = "openrlhf_gmpo/openrlhf_plugin/math_reward.py"


def expected_resolution(name: str) -> dict:
    """What each preset must resolve to: the paper's setups (FACTS.md) and the brief's MoE choices."""
    gmpo = "_gmpo" in name
    common = {"algo.kl.init_coef": 0.0, "algo.kl.use_loss": False, "algo.advantage.estimator": "group_norm"}
    common["actor.policy_loss_type"] = "gmpo" if gmpo else "grpo"
    common["rollout.n_samples_per_prompt"] = 8
    common["actor.adam.lr"] = 1e-6
    if name.startswith(("qwen2.5-math", "deepseek-r1-distill")):
        # 128 prompts x 8 = 1,024 rollouts per round, batch 128, responses up to 3,000 tokens.
        eps = [0.4, 0.4] if gmpo else [0.2, 0.2]
        return common | {
            "actor.eps_clip_low_high": eps,
            "rollout.batch_size": 128,
            "train.batch_size": 128,
            "rollout.max_new_tokens": 3000,
            "reward.remote_url": [MATH_REWARD],
        }
    if "_megatron_" in name:
        # The same algorithm on our megatron backend: EP8, TP1, fp32 router, no aux loss, 8 or 16 GPUs.
        return common | {
            "actor.eps_clip_low_high": [0.2, 0.2],
            "megatron.ep": 8,
            "megatron.tp": 1,
            "megatron.router_dtype": "fp32",
            "megatron.aux_loss_coef": 0.0,
            "actor.aux_loss_coef": 0.0,
            "rollout.batch_size": 128,
            "train.batch_size": 512,
            "actor.num_nodes": 2 if name.endswith("16gpu.yaml") else 1,
        }
    if name.startswith("qwen3-30b-a3b"):
        # Batch 128 prompts, mini-batch 64 prompts = 512 samples; 0.2/0.2 clip; aux loss off; grouped-mm experts.
        return common | {
            "actor.model_name_or_path": "Qwen/Qwen3-30B-A3B",
            "actor.eps_clip_low_high": [0.2, 0.2],
            "actor.aux_loss_coef": 0.0,
            "ds.experts_implementation": "grouped_mm",
            "rollout.batch_size": 128,
            "train.batch_size": 512,
            "data.prompt_dataset": "agentica-org/DeepScaleR-Preview-Dataset",
        }
    if name.startswith("countdown_200m"):
        # Batch 256 prompts, mini-batch 128 prompts = 1,024 samples, CountDown reward file.
        return common | {
            "actor.eps_clip_low_high": [0.4, 0.4] if gmpo else [0.2, 0.2],
            "actor.aux_loss_coef": 0.0,
            "rollout.batch_size": 256,
            "train.batch_size": 1024,
            "reward.remote_url": ["openrlhf_gmpo/countdown/reward_func.py"],
        }
    raise AssertionError(f"no expectations written for preset {name}")


@pytest.mark.parametrize("path", helpers_plugin.PRESETS, ids=PRESET_IDS)
def test_preset_resolves_to_its_values_and_the_intended_setup(path):
    plan = helpers_plugin.dry_run("--preset", path)
    args = plan.args
    for key, value in expected_resolution(os.path.basename(path)).items():
        assert helpers_plugin.resolved(args, key) == value, key
    # Every key of the file arrives unchanged (remote_url is split into a list by OpenRLHF's own validation).
    with open(path) as handle:
        preset = yaml.safe_load(handle)
    for key, value in preset.items():
        if key == "backend":
            assert plan.backend == value
            continue
        got = helpers_plugin.resolved(args, key)
        assert got == ([value] if key == "reward.remote_url" else value), key
    # Colocated vLLM engines cover exactly the actor GPUs (OpenRLHF asserts this only at train time).
    gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
    assert args.vllm.num_engines * args.vllm.tensor_parallel_size == gpus


TEMPLATED = [path for path in helpers_plugin.PRESETS if "data.input_template" in Path(path).read_text()]


@pytest.mark.parametrize("path", TEMPLATED, ids=[os.path.basename(p)[: -len(".yaml")] for p in TEMPLATED])
def test_preset_prompt_template_works_in_openrlhfs_own_dataset_code(path):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    args = helpers_plugin.dry_run("--preset", path).args
    # What PromptDataset does with each row, with the preset's own keys.
    row = {args.data.input_key: "What is 1+1?", args.data.label_key: "2"}
    prompt, label = preprocess_data(row, args.data.input_template, args.data.input_key, args.data.label_key)
    assert "What is 1+1?" in prompt and label == "2"
    assert "\\boxed{}" in prompt  # the literal braces of the instruction survive formatting


def test_command_line_overrides_the_preset_and_the_command_shows_each_flag_once():
    path = os.path.join(helpers_plugin.ROOT, "configs", "qwen2.5-math-7b_gmpo.yaml")
    argv = ["--actor.eps_clip_low_high", "0.3", "0.25", "--train.seed", "7", "--reward.clip_range", "-5", "5"]
    plan = helpers_plugin.dry_run("--preset", path, *argv)
    assert plan.args.actor.eps_clip_low_high == [0.3, 0.25]
    assert plan.args.train.seed == 7
    assert plan.tokens[-3:] == ["--reward.clip_range", "-5", "5"]  # a negative value stays with its flag
    assert plan.tokens.count("--actor.eps_clip_low_high") == 1
    flag = plan.tokens.index("--actor.eps_clip_low_high")
    assert plan.tokens[flag + 1 : flag + 3] == ["0.3", "0.25"]


def test_eps_clip_on_the_command_line_overrides_the_presets_clip_pair():
    # Every preset sets eps_clip_low_high, which OpenRLHF prefers over eps_clip: the user's eps_clip must still win.
    path = os.path.join(helpers_plugin.ROOT, "configs", "qwen3-30b-a3b_gmpo.yaml")
    plan = helpers_plugin.dry_run("--preset", path, "--actor.eps_clip", "0.1")
    assert tuple(plan.args.actor.eps_clip_low_high) == (0.1, 0.1)
    assert "--actor.eps_clip_low_high" not in plan.tokens
    # Both given: the explicit pair wins, as in OpenRLHF.
    plan = helpers_plugin.dry_run(
        "--preset", path, "--actor.eps_clip", "0.1", "--actor.eps_clip_low_high", "0.3", "0.2"
    )
    assert tuple(plan.args.actor.eps_clip_low_high) == (0.3, 0.2)


def test_abbreviated_flags_are_resolved_like_argparse_does():
    path = os.path.join(helpers_plugin.ROOT, "configs", "qwen2.5-math-7b_gmpo.yaml")
    # OpenRLHF's parser accepts unique prefixes: the command must keep the abbreviation and drop the preset's flag.
    plan = helpers_plugin.dry_run("--preset", path, "--actor.policy_loss", "grpo", "--ckpt.save_steps", "5")
    assert plan.args.actor.policy_loss_type == "grpo"
    assert "--actor.policy_loss_type" not in plan.tokens
    flag = plan.tokens.index("--actor.policy_loss")
    assert plan.tokens[flag + 1] == "grpo"
    # ...also as the very first token of a command without a preset.
    plan = helpers_plugin.dry_run(
        "--actor.model_name", "m", "--reward.remote_url", "r.py", *helpers_plugin.SEQUENCE_ADVANTAGES,
        "--actor.policy_loss_type", "gmpo",
    )  # fmt: skip
    assert plan.args.actor.model_name_or_path == "m" and plan.tokens[:2] == ["--actor.model_name", "m"]


def test_unset_turns_off_a_switch_the_preset_sets():
    path = os.path.join(helpers_plugin.ROOT, "configs", "qwen2.5-math-7b_gmpo.yaml")
    assert helpers_plugin.dry_run("--preset", path).args.ds.packing_samples is True
    plan = helpers_plugin.dry_run("--preset", path, "--unset", "ds.packing_samples")
    assert plan.args.ds.packing_samples is False and "--ds.packing_samples" not in plan.tokens
    with pytest.raises(SystemExit, match=r"--unset ds.packing: not a key of preset .*qwen2.5-math-7b_gmpo.yaml"):
        helpers_plugin.dry_run("--preset", path, "--unset", "ds.packing")


def test_a_switch_set_false_is_left_out_of_the_command(tmp_path):
    plan = helpers_plugin.dry_run("--preset", write_preset(tmp_path, BASE + "train.colocate_all: false\n"))
    assert plan.args.train.colocate_all is False and "--train.colocate_all" not in plan.tokens


def test_dry_run_prints_the_resolved_command(capsys):
    helpers_plugin.dry_run("--preset", os.path.join(helpers_plugin.ROOT, "configs", "qwen3-30b-a3b_gmpo.yaml"))
    out = capsys.readouterr().out
    assert (
        "python3 -m openrlhf_gmpo.train_ppo_ray --backend deepspeed --actor.model_name_or_path Qwen/Qwen3-30B-A3B"
        in out
    )
    assert "loss=gmpo clip=0.2/0.2" in out and "Ray not contacted" in out


BASE = "actor.model_name_or_path: m\nreward.remote_url: r.py\n"
# One advantage per sequence, as our losses need (OpenRLHF's defaults, gae and a KL reward penalty, vary it per token).
SEQUENCE_ADVANTAGES = "algo.advantage.estimator: group_norm\nrollout.n_samples_per_prompt: 2\nalgo.kl.init_coef: 0\n"

# (preset text, expected message): messages from our key checks and our validation (SystemExit with text).
BAD_PRESETS = {
    "unknown key, with suggestion": (
        BASE + "actor.policy_los_type: gmpo\n",
        "unknown key 'actor.policy_los_type'; did you mean 'actor.policy_loss_type'?",
    ),
    "clip eps zero": (BASE + "actor.eps_clip_low_high: [0.0, 0.4]\n", "both clip bounds must be > 0, got 0.0 0.4"),
    "clip eps negative": (BASE + "actor.eps_clip: -0.2\n", "both clip bounds must be > 0, got -0.2 -0.2"),
    "invalid YAML": (BASE + "actor.adam.lr: [1e-6\n", "invalid YAML"),
    "non-mapping YAML": ("- actor.adam.lr\n- 1e-6\n", "must be a mapping of OpenRLHF flag names to values, got list"),
    "empty file": ("# nothing\n", "got NoneType"),
    "null value": (BASE + "actor.adam.lr:\n", "key 'actor.adam.lr' is null"),
    "switch given a string": (BASE + "train.colocate_all: sometimes\n", "key 'train.colocate_all' is a switch"),
    "list for a one-value flag": (BASE + "actor.adam.lr: [1, 2]\n", "key 'actor.adam.lr' takes one value"),
    "one value for a two-value flag": (
        BASE + "actor.eps_clip_low_high: 0.4\n",
        "key 'actor.eps_clip_low_high' takes a list of 2 values",
    ),
    "boolean for a value flag": (BASE + "data.input_key: true\n", "key 'data.input_key' is not a switch"),
    "switch on by default set to false": (
        BASE + "actor.muon.nesterov: false\n",
        "key 'actor.muon.nesterov' is on by default; turn it off with 'actor.muon.no_nesterov: true'",
    ),
    "mapping value": (BASE + "actor.adam: {lr: 1.0e-6}\n", "unknown key 'actor.adam'"),
    "mapping for a flag": (
        BASE + "actor.adam.lr: {value: 1.0e-6}\n",
        "key 'actor.adam.lr' takes a value, got a mapping",
    ),
    "nested list": (
        BASE + "actor.eps_clip_low_high: [[0.4], 0.4]\n",
        "key 'actor.eps_clip_low_high' has a nested list [0.4]",
    ),
    "key that is not a string": (BASE + "1: 2\n", "key 1 is not a string flag name"),
    "unknown backend": (BASE + "backend: tpu\n", "--backend must be one of ('deepspeed', 'megatron'), got 'tpu'"),
    "dual clip with our loss": (
        BASE + "actor.policy_loss_type: gmpo\nactor.dual_clip: 3.0\n",
        "--actor.dual_clip 3.0: dual clip is a PPO-loss option",
    ),
    "token-level rollout correction with our loss": (
        BASE + "actor.policy_loss_type: gmpo\nalgo.advantage.is_correction_level: token\n",
        "our losses support the rollout correction only as level seq",
    ),
    "sequence-level rollout correction in clip mode (OpenRLHF's PolicyLoss refuses it)": (
        BASE + "actor.policy_loss_type: gmpo\nalgo.advantage.is_correction_level: seq\n"
        "algo.advantage.is_correction_mode: clip\n",
        "--algo.advantage.is_correction_mode clip: OpenRLHF allows it only with is_correction_level token",
    ),
    "colocated vLLM engines that do not cover the actor GPUs": (
        BASE + "train.colocate_all: true\nactor.num_gpus_per_node: 16\nvllm.num_engines: 5\n"
        "vllm.tensor_parallel_size: 3\n",
        "--vllm.num_engines 5 x --vllm.tensor_parallel_size 3 = 15, but --actor.num_nodes 1 x "
        "--actor.num_gpus_per_node 16 = 16",
    ),
    "megatron flag without the megatron backend": (BASE + "megatron.ep: 8\n", "unknown key 'megatron.ep'"),
    "megatron backend with OpenRLHF's ppo loss": (
        BASE + "backend: megatron\nactor.policy_loss_type: ppo\n",
        "the megatron backend computes our losses only",
    ),
    "megatron backend validation runs": (
        BASE + "backend: megatron\nactor.policy_loss_type: gmpo\nmegatron.ep: 0\n" + SEQUENCE_ADVANTAGES,
        "--megatron.ep 0 must be >= 1",
    ),
    "per-token advantages (OpenRLHF's default gae) with our loss": (
        BASE + "actor.policy_loss_type: gmpo\nalgo.kl.init_coef: 0\n",
        "--algo.advantage.estimator gae: gives per-token advantages",
    ),
    "discounted reinforce with our loss": (
        BASE + "actor.policy_loss_type: gmpo\nalgo.advantage.estimator: reinforce\nalgo.advantage.gamma: 0.99\n"
        "algo.kl.init_coef: 0\n",
        "--algo.advantage.gamma 0.99: with reinforce it discounts returns per token",
    ),
    "KL penalty in the reward with our loss": (
        BASE + "actor.policy_loss_type: gmpo\nalgo.advantage.estimator: group_norm\nrollout.n_samples_per_prompt: 2\n",
        "--algo.kl.init_coef 0.01: a KL penalty folded into the reward varies per token",
    ),
    "input template with literal braces": (
        BASE + 'data.input_template: "answer in \\\\boxed{}. {}"\n',
        "--data.input_template 'answer in \\\\boxed{}. {}': OpenRLHF fills it with template.format(prompt), which "
        "fails here (IndexError",
    ),
    "loss aggregation with our loss": (
        BASE + "actor.policy_loss_type: grpo\nactor.loss_agg_mode: seq-mean-token-mean\n",
        "our losses aggregate per sequence",
    ),
}

# Errors from OpenRLHF's own parser (exit code 2, message on stderr), prefixed with the preset file.
PARSER_ERRORS = {
    "wrong type": (BASE + "actor.adam.lr: fast\n", "argument --actor.adam.lr: invalid float value: 'fast'"),
    "unknown loss name": (
        BASE + "actor.policy_loss_type: gmpoo\n",
        "argument --actor.policy_loss_type: invalid choice",
    ),
    "wrong list length": (BASE + "actor.eps_clip_low_high: [0.4]\n", "argument --actor.eps_clip_low_high: expected 2"),
}


def write_preset(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", BAD_PRESETS, ids=list(BAD_PRESETS))
def test_bad_preset_fails_with_a_message_naming_the_problem(tmp_path, case):
    text, message = BAD_PRESETS[case]
    with pytest.raises(SystemExit) as error:
        helpers_plugin.dry_run("--preset", write_preset(tmp_path, text))
    assert message in str(error.value.code)


@pytest.mark.parametrize("case", PARSER_ERRORS, ids=list(PARSER_ERRORS))
def test_bad_value_is_caught_by_openrlhf_parser_and_names_preset_and_key(tmp_path, capsys, case):
    text, message = PARSER_ERRORS[case]
    path = write_preset(tmp_path, text)
    with pytest.raises(SystemExit) as error:
        helpers_plugin.dry_run("--preset", path)
    assert error.value.code == 2
    stderr = capsys.readouterr().err
    assert f"preset {path}: " in stderr and message in stderr


def test_missing_preset_file(tmp_path):
    with pytest.raises(SystemExit, match="preset .*absent.yaml: file not found"):
        helpers_plugin.dry_run("--preset", str(tmp_path / "absent.yaml"))


def test_openrlhf_own_validation_still_runs(tmp_path):
    # OpenRLHF's main block asserts that group_norm has more than one sample per prompt.
    text = BASE + "algo.advantage.estimator: group_norm\nrollout.n_samples_per_prompt: 1\n"
    with pytest.raises(AssertionError, match="group_norm requires n_samples_per_prompt > 1"):
        helpers_plugin.dry_run("--preset", write_preset(tmp_path, text))
