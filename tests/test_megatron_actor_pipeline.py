"""MegatronPolicyActor with 2 pipeline stages on a local Ray cluster (2 CPU actors, PP=2, DP=1), driven as OpenRLHF's
PPO trainer drives it; ~40 s. Then 4 actors at pp2 x ep2 (DP 2), ~50 s.

The model is the CountDown models' kind: top-1 routing and a tied embedding, whose copy on the last stage megatron
keeps equal to the first stage's. megatron orders pipeline ranks last, so OpenRLHF's two chunks (one per rank) go to
the two stages of the one replica: each stage pools both chunks, and `forward` hands each rank its own rows back.
With routing replay: `forward` records every pooled sequence's routing on each stage (its own layer), and `fit`
replays it; a sequence whose routing a stage had not recorded would fail the step.
Expected values come from the same GMPO step taken by a plain HF model on the whole batch in this process.
"""

import helpers_actors as ha
import helpers_megatron as hm
import helpers_plugin
import pytest
import ray
import torch
from transformers import Qwen3MoeForCausalLM

LR, MAX_NORM = 1e-3, 0.1


@pytest.fixture(scope="module")
def actor_run(tmp_path_factory):
    from openrlhf_gmpo.megatron.actor import MegatronPolicyActor

    tmp = tmp_path_factory.mktemp("megatron_actor_pp")
    pretrain = str(tmp / "pretrain")
    hm.tiny_hf_moe_top1_tied().save_pretrained(pretrain)
    args = helpers_plugin.dry_run(
        "--backend", "megatron", "--actor.model_name_or_path", pretrain, "--actor.num_gpus_per_node", "2",
        "--megatron.pp", "2", "--megatron.routing_replay", "--actor.policy_loss_type", "gmpo",
        "--actor.eps_clip_low_high", "0.4", "0.4", "--algo.advantage.estimator", "group_norm",
        "--algo.kl.init_coef", "0",
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "1", "--actor.adam.lr", str(LR), "--actor.lr_scheduler", "constant",
        "--actor.max_norm", str(MAX_NORM),
        "--ckpt.path", str(tmp / "ckpt"), "--ckpt.output_dir", str(tmp / "hf_out"),
    ).args  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ha.cpu_worker_env("megatron")})
    try:
        actor_class = ray.remote(num_gpus=0, num_cpus=1)(MegatronPolicyActor)
        actors = ha.start_actors(actor_class, args, pretrain)
        old = ha.forward(actors)
        uneven = _uneven_forward(actors)
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
    args = helpers_plugin.dry_run(
        "--backend", "megatron", "--actor.model_name_or_path", pretrain, "--actor.num_gpus_per_node", "4",
        "--megatron.pp", "2", "--megatron.ep", "2", "--megatron.routing_replay", "--actor.policy_loss_type", "gmpo",
        "--actor.eps_clip_low_high", "0.4", "0.4", "--algo.advantage.estimator", "group_norm",
        "--algo.kl.init_coef", "0",
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "1", "--actor.adam.lr", str(LR), "--actor.lr_scheduler", "constant",
        "--actor.max_norm", str(MAX_NORM),
    ).args  # fmt: skip
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


def _uneven_forward(actors):
    """Rank 0 gets its two rows as two micro-batches, rank 1 nothing: each of rank 0's forwards runs through both
    stages with rank 1's one-token padding batch beside it."""
    chunk = hm.forward_chunk(0)
    two = {key: [rows[0][:1], rows[0][1:]] for key, rows in chunk.items()}
    none = {key: [] for key in chunk}
    refs = [actors[0].execute_batch.remote("forward", two, 0, 2), actors[1].execute_batch.remote("forward", none, 0, 0)]
    return ray.get(refs, timeout=120)


def _reference(make_hf=hm.tiny_hf_moe_top1_tied):
    """The same step in one HF process: old policy = the initial weights (ratio 1 at the step)."""
    batch = hm.policy_batch()
    model = make_hf()
    with torch.no_grad():
        old = hm.hf_action_log_probs(model, batch)
    grad_norm, state = hm.hf_reference_update(model, batch, old_log_probs=old, lr=LR, clip_grad=MAX_NORM)
    with torch.no_grad():
        new = hm.hf_action_log_probs(model, batch)
    return old, grad_norm, state, new


def _rank_rows(rank):
    rows = [2 * rank, 2 * rank + 1]
    return rows, hm.policy_batch()["action_mask"][rows]


def test_forward_returns_each_rank_the_hf_log_probs_of_its_own_chunk(actor_run):
    results, _ = actor_run
    old, _, _, _ = _reference()
    for rank in range(2):
        rows, mask = _rank_rows(rank)
        assert results["old"][rank].shape == (2, 6)
        torch.testing.assert_close(results["old"][rank][mask], old[rows][mask], atol=1e-4, rtol=0)
    first, second = results["uneven"][0]
    assert results["uneven"][1] == []
    rows, mask = _rank_rows(0)
    torch.testing.assert_close(torch.cat([first, second])[mask], results["old"][0][mask], atol=1e-5, rtol=0)


def test_fit_is_one_gmpo_step_over_the_pooled_chunks(actor_run):
    results, _ = actor_run
    _, grad_norm, _, new = _reference()
    for rank in range(2):
        status = results["status"][rank]
        # Both stages report the one replica's status: the whole batch's norm (clipped) and mean reward.
        assert status["actor_grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
        assert grad_norm > MAX_NORM
        assert status["seq_ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert status["reward"] == pytest.approx(0.0, abs=1e-6)  # advantages 1.0, -0.5, 0.7, -1.2 from both chunks
        rows, mask = _rank_rows(rank)
        torch.testing.assert_close(results["new"][rank][mask], new[rows][mask], atol=1e-4, rtol=0)
        assert (results["new"][rank][mask] - results["old"][rank][mask]).abs().max() > 1e-3


def test_save_model_and_checkpoint_resume(actor_run):
    results, tmp = actor_run
    _, _, reference_state, _ = _reference()
    saved = Qwen3MoeForCausalLM.from_pretrained(str(tmp / "hf_out"), dtype=torch.float32).state_dict()
    assert saved.keys() == reference_state.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, reference_state[name], atol=1e-5, rtol=0, msg=name)
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
