"""Ray job scripts: DRY_RUN=1 resolves through OpenRLHF's real parser; otherwise one `ray job submit`."""

import json
import os
import stat
import subprocess
import sys

import helpers_plugin
import helpers_stubs
import pytest

SCRIPT_IDS = [os.path.relpath(path, helpers_plugin.ROOT) for path in helpers_plugin.PRESET_SCRIPTS]


def recorder(tmp_path, name: str) -> str:
    """An executable that records its arguments and working directory as JSON (stands in for python3 or ray)."""
    path = tmp_path / name
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(tmp_path / (name + '.json'))!r}, 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, f)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def run_script(script: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *extra], env=env, capture_output=True, text=True, timeout=120)


def test_every_preset_has_a_script_and_every_script_a_preset():
    scripts = {os.path.basename(path)[: -len(".sh")] for path in helpers_plugin.PRESET_SCRIPTS}
    presets = {os.path.basename(path)[: -len(".yaml")] for path in helpers_plugin.PRESETS}
    assert scripts == presets


@pytest.mark.parametrize("script", helpers_plugin.PRESET_SCRIPTS, ids=SCRIPT_IDS)
def test_dry_run_command_resolves_through_openrlhf_parser(script, tmp_path, monkeypatch):
    # The script's DRY_RUN command is recorded, then run in this process (OpenRLHF is imported once for all).
    env = dict(os.environ, DRY_RUN="1", PYTHON=recorder(tmp_path, "python"), NODES="2", GPUS_PER_NODE="4")
    env["MODEL"] = "/shared/models/m"
    result = run_script(script, env, "--train.seed", "11")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "python.json") as handle:
        recorded = json.load(handle)
    name = os.path.basename(script)[: -len(".sh")]
    assert recorded["cwd"] == helpers_plugin.ROOT
    assert recorded["argv"][:4] == ["-m", "openrlhf_gmpo.train_ppo_ray", "--preset", f"configs/{name}.yaml"]
    assert recorded["argv"][-1] == "--dry-run"

    monkeypatch.chdir(helpers_plugin.ROOT)
    from openrlhf_gmpo.train_ppo_ray import main

    args = main(recorded["argv"][2:]).args
    assert (args.actor.num_nodes, args.actor.num_gpus_per_node) == (2, 4)
    assert args.vllm.num_engines * args.vllm.tensor_parallel_size == 8  # NODES * GPUS_PER_NODE, colocated
    assert args.actor.model_name_or_path == "/shared/models/m"
    assert args.train.seed == 11  # "$@" passed through, after the preset and the script's own flags


def test_dry_run_notes_local_inputs_that_do_not_exist(tmp_path):
    script = os.path.join(helpers_plugin.ROOT, "scripts", "dense", "qwen2.5-math-7b_gmpo.sh")
    env = dict(os.environ, DRY_RUN="1", PYTHON=recorder(tmp_path, "python"))
    cases = {  # (MODEL, DATASET) -> the notes expected on stderr
        (str(tmp_path / "absent-model"), "someone/math-prompts"): [f"MODEL {tmp_path / 'absent-model'} does not exist"],
        (str(tmp_path), "no-such/train/p.jsonl"): ["DATASET no-such/train/p.jsonl is not in the repository"],
        ("Qwen/Qwen2.5-Math-7B", str(tmp_path)): [],  # a Hub id and an existing path: nothing to say
    }
    for (model, dataset), notes in cases.items():
        result = run_script(script, dict(env, MODEL=model, DATASET=dataset))
        assert result.returncode == 0, result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("# note:")] == [
            f"# note: {note}" + (" here; the job needs it at this path on every node" if "does not" in note else
                                 "; the job reads it from its copy of the repository")
            for note in notes
        ]  # fmt: skip


def test_dry_run_end_to_end_with_the_real_interpreter(stub_env):
    script = os.path.join(helpers_plugin.ROOT, "scripts", "moe", "countdown_200m_gmpo.sh")
    env = dict(stub_env, DRY_RUN="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr[-3000:]
    command, summary = result.stdout.strip().splitlines()[-2:]
    assert command.startswith("python3 -m openrlhf_gmpo.train_ppo_ray --backend deepspeed ")
    assert f"--actor.model_name_or_path {helpers_plugin.ROOT}/ckpt/countdown-200m-sft" in command
    assert "loss=gmpo clip=0.4/0.4" in summary and "Ray not contacted" in summary


@pytest.mark.parametrize(
    "entry_point, missing",
    [
        (["openrlhf_gmpo.train_ppo_ray", "--actor.policy_loss_type", "gmpo", "--dry-run"], "vllm"),
        (["openrlhf_gmpo.countdown.check_sft_args", "--pretrain", "x"], "flash_attn_2_cuda"),
    ],
)
def test_dry_run_without_gpu_modules_says_what_is_missing(entry_point, missing):
    # Without the test stubs OpenRLHF's entry points cannot even be imported here: the user gets one clear line.
    if helpers_stubs.is_really_installed(missing):
        pytest.skip(f"{missing} is installed: nothing to refuse")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", *entry_point],
        cwd=helpers_plugin.ROOT,
        env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"needs {missing!r} (" in result.stderr and "run on a machine of your GPU cluster" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_needs_ray_address():
    script = os.path.join(helpers_plugin.ROOT, "scripts", "dense", "qwen2.5-math-7b_gmpo.sh")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "DRY_RUN")}
    result = run_script(script, env)
    assert result.returncode != 0
    assert "set RAY_ADDRESS" in result.stderr


@pytest.mark.parametrize("gpus", ["8gpu", "16gpu"])
def test_megatron_scripts_take_the_expert_and_pipeline_sizes_from_the_environment(gpus, tmp_path, monkeypatch):
    script = os.path.join(helpers_plugin.ROOT, "scripts", "moe", f"qwen3-30b-a3b_gmpo_megatron_{gpus}.sh")
    env = dict(os.environ, DRY_RUN="1", PYTHON=recorder(tmp_path, "python"), EP="4", PP="2")
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "python.json") as handle:
        argv = json.load(handle)["argv"]
    monkeypatch.chdir(helpers_plugin.ROOT)
    from openrlhf_gmpo.train_ppo_ray import main

    args = main(argv[2:]).args  # validated by the launcher: GPUs divisible by pp 2 and by ep 4 x pp 2
    assert (args.megatron.ep, args.megatron.pp) == (4, 2)


@pytest.mark.parametrize("setting", ["NODES=abc", "GPUS_PER_NODE=8x", "VLLM_TP=0"])
def test_cluster_sizes_that_are_not_positive_whole_numbers_are_refused(setting):
    # bash arithmetic reads NODES=abc as an unset variable and VLLM_TP=0 as a division by zero: refuse them by name
    name, value = setting.split("=")
    script = os.path.join(helpers_plugin.ROOT, "scripts", "moe", "qwen3-30b-a3b_gmpo.sh")
    result = run_script(script, dict(os.environ, DRY_RUN="1", **{name: value}))
    assert result.returncode == 2
    assert result.stderr.strip() == f"qwen3-30b-a3b_gmpo.sh: {setting} must be a positive whole number"


def test_vllm_tensor_parallel_size_must_divide_the_gpus():
    # 2 nodes x 8 GPUs with VLLM_TP=3 would start 5 engines on 15 GPUs (integer division) and leave one idle
    script = os.path.join(helpers_plugin.ROOT, "scripts", "moe", "qwen3-30b-a3b_gmpo.sh")
    result = run_script(script, dict(os.environ, DRY_RUN="1", NODES="2", GPUS_PER_NODE="8", VLLM_TP="3"))
    assert result.returncode == 2
    assert result.stderr.strip() == "qwen3-30b-a3b_gmpo.sh: VLLM_TP=3 must divide NODES x GPUS_PER_NODE = 16"


def test_submit_is_one_ray_job_with_the_repository_as_working_dir(tmp_path):
    # A recorder named `ray` first on PATH captures the submission instead of a cluster.
    recorder(tmp_path, "ray")
    script = os.path.join(helpers_plugin.ROOT, "scripts", "moe", "qwen3-30b-a3b_gmpo.sh")
    env = dict(os.environ, RAY_ADDRESS="http://head:8265", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env.pop("DRY_RUN", None)
    result = run_script(script, env, "--train.seed", "3")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "ray.json") as handle:
        argv = json.load(handle)["argv"]
    assert argv[:4] == ["job", "submit", "--address", "http://head:8265"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == helpers_plugin.ROOT
    assert ".venv" in runtime_env["excludes"]
    separator = argv.index("--")
    assert argv[separator + 1 : separator + 6] == [
        "python3",
        "-m",
        "openrlhf_gmpo.train_ppo_ray",
        "--preset",
        "configs/qwen3-30b-a3b_gmpo.yaml",
    ]
    assert argv[-2:] == ["--train.seed", "3"]
    # Qwen3-30B-A3B: 2 nodes x 8 GPUs by default, vLLM tensor parallel 4 -> 4 engines.
    assert argv[argv.index("--vllm.num_engines") + 1] == "4"
