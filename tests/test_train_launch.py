"""OpenRLHF's real `train()` with either backend, launched as a user launches it, up to the first rollout.

`python -m openrlhf_gmpo.train_ppo_ray --preset configs/countdown_200m_gmpo.yaml --backend megatron|deepspeed ...` on
a local Ray cluster that advertises 2 GPUs (the machine has none: the actors run on CPU, with the backend's CPU shims
installed at worker start-up by stub_site/sitecustomize.py). Everything on the way is OpenRLHF's or ours, unfaked:
its parser and validation, `train()`, `RayActorGroup` placing our policy actor (`MegatronPolicyActor` at EP=2, or
`GMPOPolicyModelActor` with DeepSpeed ZeRO; the test checks which class Ray ran) on a placement group of GPU
bundles, `PPOTrainer` loading the tokenizer and the CountDown prompts, `get_max_steps`, our actors' init through
`async_init_model_from_pretrained`, and `fit()`. The first rollout needs vLLM, which cannot run here: the run must
stop exactly there, at the vLLM import stub, and nowhere earlier. (The steps after a rollout, forward, append, fit,
save, are driven directly in test_megatron_actor.py and test_plugin_deepspeed_actor.py.)
"""

import os

import helpers_actors
import pytest
import ray
import torch

from openrlhf_gmpo import cli, train_ppo_ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BACKEND_FLAGS = {
    "megatron": ["--backend", "megatron", "--megatron.ep", "2"],
    # OpenRLHF's Actor with torch's attention (flash-attn has no CPU kernels), ZeRO from the preset
    "deepspeed": ["--backend", "deepspeed", "--ds.attn_implementation", "sdpa"],
}
# The policy actor class each backend must launch: ours, whose init installs the loss (OpenRLHF's own
# PolicyModelActor would reach the first rollout too).
POLICY_ACTOR_CLASS = {"megatron": "MegatronPolicyActor", "deepspeed": "_GMPOPolicyModelActor"}


@pytest.fixture(params=sorted(BACKEND_FLAGS))
def fake_gpu_ray(request):
    """Ray with 2 advertised GPUs (OpenRLHF's placement groups ask for them) and 4 logical CPUs: 2 for the actor
    bundles, 1 for the PPOTrainer actor, 1 spare. Yields the backend its workers are set up for."""
    env = helpers_actors.cpu_worker_env(request.param, hide_gpus=False)  # skipped on GPU machines instead
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield request.param
    ray.shutdown()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the actors on CPU; on a GPU machine Ray would hand one of them a real GPU"
)
def test_countdown_preset_runs_until_the_first_rollout(tmp_path, monkeypatch, fake_gpu_ray):
    # The preset's relative paths (reward file) resolve from the repository root, as in a Ray job's working_dir.
    monkeypatch.chdir(ROOT)
    countdown = tmp_path / "countdown"
    sizes = ["--size", "tiny", "--train", "8", "--val", "2", "--sft", "2"]
    assert cli.main(["countdown", "all", "--out", str(countdown), *sizes]) == 0
    with pytest.raises(ray.exceptions.RayTaskError) as failure:
        train_ppo_ray.main(
            [
                "--preset", "configs/countdown_200m_gmpo.yaml", *BACKEND_FLAGS[fake_gpu_ray],
                "--actor.model_name_or_path", str(countdown / "model-tiny"),
                "--data.prompt_dataset", str(countdown / "data" / "train.jsonl"),
                "--actor.num_gpus_per_node", "2",
                # The preset's colocation (actors at 0.2 GPU on a shared placement group) and sleep mode stay on;
                # there is no vLLM engine to share the GPUs with.
                "--vllm.num_engines", "0",
                "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4",
                "--train.micro_batch_size", "1", "--rollout.micro_batch_size", "1", "--data.max_samples", "8",
                "--data.max_len", "128", "--rollout.max_new_tokens", "16",
                "--ckpt.path", str(tmp_path / "ckpt"), "--ckpt.output_dir", str(tmp_path / "out"),
            ]
        )  # fmt: skip
    # The trainer got as far as building the first rollout's vLLM sampling parameters: everything before it (actor
    # group placement, our actors' init, the trainer's datasets and max_steps) ran. A failure anywhere
    # earlier raises a different error.
    message = str(failure.value)
    assert "vllm.SamplingParams is an import stub" in message, message
    assert "PPOTrainer.fit" in message and "generate_samples" in message, message
    launched = {info["ActorClassName"] for info in ray._private.state.actors().values()}
    assert POLICY_ACTOR_CLASS[fake_gpu_ray] in launched and "PolicyModelActor" not in launched, launched
