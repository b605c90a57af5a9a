"""MegatronPolicyActor on a local Ray cluster, driven as OpenRLHF's PPO trainer drives it (2 CPU actors, EP=2, DP=2).

The launcher's way of wrapping it (`ray.remote`), the arguments from the real launcher in dry-run mode
(`--backend megatron`, OpenRLHF's own parser), a saved tiny HF Qwen3-MoE checkpoint; one run (~60 s) goes
forward through `execute_batch` -> `append` -> `fit` (one GMPO step with routing replay) -> `save_model` ->
`save_checkpoint`, then two fresh actors resume from the checkpoint. Expected values come from the same GMPO step
taken by a plain HF model in this process. With `--ds.enable_sleep`, as OpenRLHF does: the actors start offloaded,
`forward` and the saves run offloaded, and each `fit` sits between `reload_states` and `offload_states`.

`broadcast_to_vllm` needs vLLM and NCCL: its skip reason below says what is tested instead.
"""

import copy
import os

import helpers_actors as ha
import helpers_megatron as hm
import pytest
import ray
import torch

LR, MAX_NORM = ha.STEP_LR, ha.STEP_MAX_NORM


@pytest.fixture(scope="module")
def actor_run(tmp_path_factory):
    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    tmp = tmp_path_factory.mktemp("megatron_actor")
    pretrain = str(tmp / "pretrain")
    hm.tiny_hf_moe().save_pretrained(pretrain)
    args = ha.megatron_args(
        pretrain, 2, "--megatron.ep", "2", "--megatron.routing_replay", "--ckpt.path", str(tmp / "ckpt"),
        "--ckpt.max_num", "1", "--ckpt.output_dir", str(tmp / "hf_out"), "--ds.enable_sleep",
    )  # fmt: skip
    env = ha.cpu_worker_env("megatron")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        # What the launcher does for --backend megatron, without the GPU this machine lacks.
        actor_class = ray.remote(num_gpus=0, num_cpus=1)(MegatronPolicyActor)
        actors = ha.start_actors(actor_class, args, pretrain)
        grad_storage = {"after_init": _grad_storage(actors)}
        ray.get([a.reload_states.remote() for a in actors])
        grad_storage["reloaded"] = _grad_storage(actors)
        ray.get([a.offload_states.remote() for a in actors])
        old = ha.forward(actors)
        uneven = ha.uneven_forward(actors)
        status = ha.step(actors, old)
        grad_storage["after_fit"] = _grad_storage(actors)
        new = ha.forward(actors)
        ray.get([a.save_model.remote() for a in actors], timeout=120)
        ray.get([a.save_checkpoint.remote("global_step1", client_states={"episode": 2}) for a in actors])
        ray.get([a.save_checkpoint.remote("global_step2", client_states={"episode": 3}) for a in actors])
        ray.get([a.empty_cache.remote() for a in actors])
        ha.step(actors, new)  # a second step, uninterrupted: Adam's moments from the first one matter here
        second = ha.forward(actors)
        for actor in actors:
            ray.kill(actor)

        resume_args = copy.deepcopy(args)
        resume_args.ckpt.load_enable = True
        resumed = ha.start_actors(actor_class, resume_args, pretrain)
        results = dict(old=old, uneven=uneven, status=status, new=new, second=second, resumed=ha.forward(resumed))
        results["grad_storage"] = grad_storage
        results["checkpoint_states"] = ray.get([a.get_checkpoint_states.remote() for a in resumed])
        ha.step(resumed, results["resumed"])  # the same second step after the resume
        results["resumed_second"] = ha.forward(resumed)
        results["partial_status"] = _partial_step(resumed, results["resumed_second"])
        results["after_partial"] = ha.forward(resumed)
    finally:
        ray.shutdown()
    return results, tmp


def _partial_step(actors, old):
    """The last rollout of a pass over the prompts can be smaller than one optimizer step (here 1 sample per rank,
    the step takes 2): the actors skip the update instead of stopping the job."""
    batch = hm.policy_batch()
    refs = [a.append.remote(hm.experience(batch, [2 * rank], old[rank][:1])) for rank, a in enumerate(actors)]
    ray.get(refs)
    return ha.sleeping_fit(actors)


def _grad_storage(actors) -> list[list[int]]:
    """Per rank, the bytes held by each of megatron DDP's gradient buffers (dense and expert)."""

    def sizes(actor):
        buffers = actor.model.buffers + actor.model.expert_parallel_buffers
        return [b.grad_data.untyped_storage().nbytes() for b in buffers]

    return ray.get([a.__ray_call__.remote(sizes) for a in actors])


def _reference(make_hf=hm.tiny_hf_moe):
    return ha.hf_step_reference(make_hf, LR, MAX_NORM)


def test_forward_returns_hf_log_probs_of_the_rank_chunk(actor_run):
    results, _ = actor_run
    ha.check_forward(results["old"], _reference()[0])


def test_forward_with_uneven_micro_batch_counts_per_rank(actor_run):
    results, _ = actor_run
    ha.check_forward(results["old"], _reference()[0], uneven=results["uneven"])


def test_fit_is_one_gmpo_step_over_the_global_batch(actor_run):
    # The DP-averaged status, the same on both ranks; the actor's log-probs after the step are HF's after it.
    results, _ = actor_run
    _, grad_norm, _, new = _reference()
    ha.check_step(results["status"], results["old"], results["new"], grad_norm, new)


def test_save_model_writes_a_loadable_hf_checkpoint(actor_run):
    _, tmp = actor_run
    # the pretrained model's sampling defaults travel with it, as with OpenRLHF's save_pretrained
    assert (tmp / "hf_out" / "generation_config.json").read_text() == (
        tmp / "pretrain" / "generation_config.json"
    ).read_text()
    ha.check_saved_model(tmp / "hf_out", _reference()[2])


def test_checkpoint_resume_restores_weights_and_client_states(actor_run):
    results, tmp = actor_run
    # --ckpt.max_num 1: the older tag is gone, the resumed actors read the newer one.
    assert sorted(os.listdir(tmp / "ckpt" / "_actor")) == ["global_step2", "latest"]
    assert results["checkpoint_states"] == [{"episode": 3}, {"episode": 3}]
    for rank in range(2):
        torch.testing.assert_close(results["resumed"][rank], results["new"][rank], atol=0, rtol=0)
        # The step after the resume is the uninterrupted run's second step: optimizer state restored too.
        torch.testing.assert_close(results["resumed_second"][rank], results["second"][rank], atol=0, rtol=0)
        assert (results["second"][rank] - results["new"][rank]).abs().max() > 1e-3  # the second step moved


def test_fit_skips_the_update_when_a_rank_has_less_than_one_step(actor_run):
    results, _ = actor_run
    for rank in range(2):
        status = results["partial_status"][rank]
        assert status["update_skipped"] == 1.0 and status["actor_lr"] == LR
        assert status["reward"] == pytest.approx((1.0 + 0.7) / 2)  # rows 0 and 2 of policy_batch, averaged over DP
        torch.testing.assert_close(results["after_partial"][rank], results["resumed_second"][rank], atol=0, rtol=0)


def test_offload_frees_the_gradient_buffers_and_reload_restores_them(actor_run):
    storage = actor_run[0]["grad_storage"]
    for rank in range(2):
        # Both ranks hold a dense buffer and an expert buffer (EP=2); they are freed, not moved, while offloaded.
        assert len(storage["reloaded"][rank]) == 2 and min(storage["reloaded"][rank]) > 0
        assert storage["after_init"][rank] == [0, 0] and storage["after_fit"][rank] == [0, 0]
    # The step taken between reload and offload is the HF reference step (test_fit_is_one_gmpo_step...), and the
    # resumed run's steps equal the uninterrupted run's (test_checkpoint_resume...): the restored buffers work.


@pytest.mark.skip(
    reason="needs vLLM engines and the NCCL group they join with rank 0 (init_broadcast_group), i.e. GPUs and vLLM; "
    "the weights it sends (vllm_sync.sync_weights) are tested on CPU with recording engines in "
    "test_megatron_vllm_sync.py"
)
def test_broadcast_to_vllm():
    """The actor's broadcast_to_vllm end to end: what cannot run here, said in the skip reason (issue 6)."""


def test_model_path_may_be_a_local_directory_or_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from openrlhf_gmpo.megatron.hf_checkpoint import local_checkpoint_dir

    assert local_checkpoint_dir(str(tmp_path)) == str(tmp_path)
    # A Hub id goes to the Hub's cache (offline here, and not in the cache): the error names the value and the flag.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"--actor.model_name_or_path 'Qwen/Qwen3-30B-A3B' is neither"):
        local_checkpoint_dir("Qwen/Qwen3-30B-A3B")
