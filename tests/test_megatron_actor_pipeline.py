"""MegatronPolicyActor with 2 pipeline stages on a local Ray cluster (2 CPU actors, PP=2, DP=1), driven as OpenRLHF's
PPO trainer drives it; ~40 s. Then 4 actors at pp2 x ep2 (DP 2), ~30 s.

The model is the CountDown models' kind: top-1 routing and a tied embedding, whose copy on the last stage megatron
keeps equal to the first stage's. megatron orders pipeline ranks last, so OpenRLHF's two chunks (one per rank) go to
the two stages of the one replica: each stage pools both chunks, and `forward` hands each rank its own rows back.
With routing replay: `forward` records every pooled sequence's routing on each stage (its own layer), and `fit`
replays it; a sequence whose routing a stage had not recorded would fail the step.
Expected values come from the same GMPO step taken by a plain HF model on the whole batch in this process.
"""

import helpers_actors as ha
import helpers_megatron as hm
import pytest
import ray
import torch

LR, MAX_NORM = ha.STEP_LR, ha.STEP_MAX_NORM


@pytest.fixture(scope="module")
def actor_run(tmp_path_factory):
    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    tmp = tmp_path_factory.mktemp("megatron_actor_pp")
    pretrain = str(tmp / "pretrain")
    hm.tiny_hf_moe_top1_tied().save_pretrained(pretrain)
    args = ha.megatron_args(
        pretrain, 2, "--megatron.pp", "2", "--megatron.routing_replay", "--ckpt.path", str(tmp / "ckpt"),
        "--ckpt.output_dir", str(tmp / "hf_out"),
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ha.cpu_worker_env("megatron")})
    try:
        actor_class = ray.remote(num_gpus=0, num_cpus=1)(MegatronPolicyActor)
        actors = ha.start_actors(actor_class, args, pretrain)
        old = ha.forward(actors)
        uneven = ha.uneven_forward(actors)
        status = ha.step(actors, old)
        new = ha.forward(actors)
        ray.get([a.save_model.remote() for a in actors], timeout=120)
        ray.get([a.save_checkpoint.remote("global_step1", client_states={"episode": 2}) for a in actors])
        for actor in actors:
            ray.kill(actor)
        args.ckpt.load_enable = True
        resumed = ha.start_actors(actor_class, args, pretrain)
        results = dict(old=old, uneven=uneven, status=status, new=new, resumed=ha.forward(resumed))
    finally:
        ray.shutdown()
    return results, tmp


@pytest.fixture(scope="module")
def four_actor_run(tmp_path_factory):
    """4 actors at pp2 x ep2 (DP 2): OpenRLHF sends rank r row r of policy_batch; replica d's stages are ranks d and
    d + 2, so each replica pools two chunks that are not neighbours."""
    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    tmp = tmp_path_factory.mktemp("megatron_actor_pp_ep")
    pretrain = str(tmp / "pretrain")
    hm.tiny_hf_moe().save_pretrained(pretrain)
    args = ha.megatron_args(pretrain, 4, "--megatron.pp", "2", "--megatron.ep", "2", "--megatron.routing_replay")
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ha.cpu_worker_env("megatron")})
    try:
        actor_class = ray.remote(num_gpus=0, num_cpus=1)(MegatronPolicyActor)
        actors = ha.start_actors(actor_class, args, pretrain, count=4)
        pipelines = ray.get([a.__ray_call__.remote(_pipeline_ranks()) for a in actors])
        old = _forward_rows(actors)
        batch = hm.policy_batch()
        ray.get([a.append.remote(hm.experience(batch, [r], old[r])) for r, a in enumerate(actors)])
        status = ray.get([a.fit.remote(kl_ctl=0) for a in actors], timeout=120)
        results = dict(pipelines=pipelines, old=old, status=status, new=_forward_rows(actors))
    finally:
        ray.shutdown()
    return results


def _pipeline_ranks():
    """A function for `__ray_call__` (made here, so Ray sends it by value: workers cannot import this module)."""

    def ranks(actor):
        from megatron.core import parallel_state as ps

        return torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())

    return ranks


def _forward_rows(actors):
    """Rank r's log-probs of row r of policy_batch, through execute_batch("forward", ...)."""
    batch = hm.policy_batch()
    chunks = [{k: [batch[k][[r]]] for k in ("sequences", "action_mask", "attention_mask")} for r in range(len(actors))]
    refs = [a.execute_batch.remote("forward", chunks[r], 0, 1) for r, a in enumerate(actors)]
    return [result[0] for result in ray.get(refs, timeout=120)]


def _reference(make_hf=hm.tiny_hf_moe_top1_tied):
    return ha.hf_step_reference(make_hf, LR, MAX_NORM)


def test_forward_returns_each_rank_the_hf_log_probs_of_its_own_chunk(actor_run):
    results, _ = actor_run
    ha.check_forward(results["old"], _reference()[0], uneven=results["uneven"])


def test_fit_is_one_gmpo_step_over_the_pooled_chunks(actor_run):
    # Both stages report the one replica's status: the step over both chunks.
    results, _ = actor_run
    _, grad_norm, _, new = _reference()
    ha.check_step(results["status"], results["old"], results["new"], grad_norm, new)


def test_save_model_and_checkpoint_resume(actor_run):
    results, tmp = actor_run
    ha.check_saved_model(tmp / "hf_out", _reference()[2])
    for rank in range(2):
        torch.testing.assert_close(results["resumed"][rank], results["new"][rank], atol=0, rtol=0)


def test_four_actors_pool_each_replicas_chunks_across_non_neighbouring_ranks(four_actor_run):
    results = four_actor_run
    assert results["pipelines"] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    old, grad_norm, _, new = _reference(hm.tiny_hf_moe)
    mask = hm.policy_batch()["action_mask"]
    for rank in range(4):
        torch.testing.assert_close(results["old"][rank][mask[[rank]]], old[[rank]][mask[[rank]]], atol=1e-4, rtol=0)
        # Replica 0 trained on rows 0 and 2, replica 1 on rows 1 and 3: together the HF step over all four.
        assert results["status"][rank]["actor_grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
        assert results["status"][rank]["reward"] == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(results["new"][rank][mask[[rank]]], new[[rank]][mask[[rank]]], atol=1e-4, rtol=0)
