"""Pipeline parallelism (2 stages) in the megatron backend, on 4 gloo CPU processes (one spawn, ~20 s on 2 cores).

Against a tiny HF Qwen3-MoE in one process, at pp2, pp2 x ep2, and pp2 x ep2 with top-1 routing and a tied
embedding (helpers_megatron_pipeline.LAYOUTS): log-probs through megatron-core's pipeline schedule, the streaming
export, and one GMPO update (clipped gradients, AdamW) with each replica's stages on its share of the batch; the
update also with routing replay, and through megatron's own distributed optimizer as on GPUs.
"""

import helpers_megatron as hm
import helpers_megatron_pipeline as hp
import pytest
import torch

LAYOUTS = list(hp.LAYOUTS)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return hm.spawn_suite(hp.pipeline_suite_worker, 4, tmp_path_factory.mktemp("megatron_pipeline"))


def test_pipeline_ranks_come_last_in_megatrons_order(suite):
    # The stages of one replica are ranks r and r + 2, not neighbours: OpenRLHF's chunk per rank reaches both
    # stages of a replica only because the actor pools them (test_megatron_actor_pipeline.py).
    for layout in LAYOUTS:
        for rank in range(4):
            groups = suite[rank][layout]["groups"]
            assert groups["pipeline"] == [rank % 2, rank % 2 + 2]
            assert groups["stage"] == rank // 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_log_probs_through_the_stages_match_hf(suite, layout):
    for rank in range(4):
        result = suite[rank][layout]
        # fp32 on both sides; what is left is summation order (measured 4.8e-7).
        assert result["eval"]["log_prob_error"] < 1e-4
        assert result["eval"]["log_prob_error_both_sides"] < 1e-4
        # Two micro-batches of different sizes and lengths: (3 rows, 12 tokens), (1 row, 8 tokens).
        assert result["ragged"]["shapes"] == [(3, 11), (1, 7)]
        assert result["ragged"]["log_prob_error"] < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_stage_exports_the_whole_hf_model(suite, layout):
    for rank in range(4):
        assert suite[rank][layout]["eval"]["export_mismatches"] == []
        assert suite[rank][layout]["eval"]["export_extra"] == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gmpo_update_through_the_stages_is_the_hf_update(suite, layout):
    make_hf = hp.LAYOUTS[layout][0]
    batch = hm.policy_batch()
    reference = make_hf()
    before = {n: t.clone() for n, t in reference.state_dict().items()}
    norm, state, reference_grads = hm.hf_policy_batch_update(reference)
    assert norm > hm.UPDATE["clip_grad"]  # clipping is exercised
    for rank in range(4):
        metrics, after, grads = suite[rank][layout]["update"]
        # Every rank reports the global norm: the tied embedding's two copies counted once, stages and experts summed.
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert metrics["update_skipped"] == 0.0
        # Each stage reports its replica's loss, which the last stage computed (2 of the 4 sequences each).
        assert metrics["policy_loss"] == suite[rank % 2 + 2][layout]["update"][0]["policy_loss"]
        for name, grad in grads.items():
            # A tied model's HF state has no separate lm_head gradient: the embedding's is the sum of both uses.
            if name in reference_grads:
                torch.testing.assert_close(grad, reference_grads[name], atol=1e-8, rtol=1e-4, msg=f"{layout} {name}")
        for name, tensor in after.items():
            torch.testing.assert_close(tensor, state[name], atol=1e-5, rtol=0, msg=f"{layout} {name}")
    moved = max((state[n] - before[n]).abs().max().item() for n in before)
    assert moved > 5e-4
    # Each replica's loss is scaled by the DP size (DDP averages gradients over replicas): their mean is the loss
    # of the whole batch.
    whole = (suite[2][layout]["update"][0]["policy_loss"] + suite[3][layout]["update"][0]["policy_loss"]) / 2
    assert whole == pytest.approx(_hf_loss(make_hf, batch), rel=1e-5)


def test_micro_batches_of_different_shapes_train_through_the_stages(suite):
    norm, state, _ = hm.hf_policy_batch_update(hm.tiny_hf_moe())
    # Stage s of replica d is rank d + 2s: replica 0 ran one (2 x 12) micro-batch, replica 1 a (1 x 12) and a (1 x 8).
    assert [suite[rank]["ragged_update"][1] for rank in range(2)] == [[(2, 12)], [(1, 12), (1, 8)]]
    for rank in range(4):
        grad_norm, _, weights = suite[rank]["ragged_update"]
        assert grad_norm == pytest.approx(norm, rel=1e-5)
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, state[name], atol=1e-5, rtol=0, msg=name)


def test_routing_replay_through_the_stages_replays_the_recorded_experts(suite):
    # Routing recorded through each layout's own forward, then every router negated (each top-k choice flips): the
    # replayed update at pp2 x ep2 (each stage replays its own layer, micro-batches interleaved by the schedule) is
    # the replayed update at ep2 on one stage; routing freely instead gives another update.
    for rank in range(4):
        replay = suite[rank]["replay"]
        one_stage_norm, one_stage, one_stage_grads = replay["ep2"]
        norm, weights, grads = replay["pp2_ep2"]
        assert norm == pytest.approx(one_stage_norm, rel=1e-5)
        hm.assert_same_step(weights, grads, one_stage, one_stage_grads, weight_atol=1e-6)
        free_norm, free, _ = replay["pp2_ep2_free"]
        assert abs(free_norm - one_stage_norm) > 0.1  # measured 0.47 vs 0.98
        assert max((free[n] - one_stage[n]).abs().max().item() for n in free) > 1e-3  # measured 2e-3 (lr 1e-3)


def test_routing_replay_holds_through_activation_recomputation(suite):
    # --megatron.recompute re-runs each layer in the backward, router included: it must take the experts queued for
    # that micro-batch (megatron's REPLAY_BACKWARD, switched on at each micro-batch's backward), or the gradients
    # come from the experts the negated routers pick. With one stage (ep2) and through the pipeline schedule
    # (pp2 x ep2, forwards of two micro-batches queued before their backwards), the update is the replayed one
    # without recomputation; and recomputation with free routing is the free update.
    for rank in range(4):
        replay = suite[rank]["replay"]
        reference_norm, reference, reference_grads = replay["ep2"]
        for case in ("ep2_recompute", "pp2_ep2_recompute"):
            norm, weights, grads = replay[case]
            assert norm == pytest.approx(reference_norm, rel=1e-5), case
            hm.assert_same_step(weights, grads, reference, reference_grads, case, weight_atol=1e-6)
        free_norm, free, free_grads = replay["pp2_ep2_free"]
        norm, weights, grads = replay["pp2_ep2_recompute_free"]
        assert norm == pytest.approx(free_norm, rel=1e-5)
        hm.assert_same_step(weights, grads, free, free_grads, weight_atol=1e-6)


def test_megatrons_gpu_optimizer_through_the_stages_is_the_hf_update(suite):
    # pp2 x ep2, tied embedding, with CUDA tensors emulated: megatron's DDP buffers and distributed optimizer (fp32
    # here, so the comparison stays tight), which compute the norm and clip themselves.
    norm, state, _ = hm.hf_policy_batch_update(hm.tiny_hf_moe_top1_tied())
    for rank in range(4):
        metrics, after, _ = suite[rank]["gpu_optimizer"]["update"]
        assert metrics["optimizer"] == "ChainedOptimizer"  # megatron's, one per dense and expert parameters
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        for name, tensor in after.items():
            torch.testing.assert_close(tensor, state[name], atol=1e-5, rtol=0, msg=name)


def _hf_loss(make_hf, batch) -> float:
    from openrlhf_gmpo.losses import compute_policy_loss

    with torch.no_grad():
        log_probs = hm.hf_action_log_probs(make_hf(), batch)
    loss, _ = compute_policy_loss(
        "gmpo", log_probs, batch["old_log_probs"], batch["advantages"], batch["action_mask"],
        clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4, dp_size=1,
    )  # fmt: skip
    return loss.item()
