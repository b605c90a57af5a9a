"""The megatron backend on 2 gloo CPU processes against a tiny HF Qwen3-MoE (hidden 32, 2 layers, 4 experts, top-2).

One spawn (`helpers_megatron.suite_worker`, ~40 s on 2 cores) runs every layout; each test reads its part:
- HF -> megatron at EP=1 (DP=2), EP=2 and TP=2, a dense Qwen3 at TP=2 and a top-1 tied-embedding MoE (the
  CountDown models' routing) at EP=2: per-token log-probs equal HF's;
- megatron -> HF streaming export reproduces the HF state dict bit for bit, in the fused and per-expert layouts,
  and across 2 pipeline stages (log-probs and updates through the stages: test_megatron_pipeline.py);
- one GMPO update at EP=2 and at ETP=2 equals the update at EP=1 and a plain single-process HF + AdamW update, and
  so does one of a dense Qwen3 at TP=2;
- routing replay re-routes a re-batched pass exactly as recorded.
"""

import math

import helpers_megatron as hm
import pytest
import torch


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return hm.spawn_suite(hm.suite_worker, 2, tmp_path_factory.mktemp("megatron_suite"))


@pytest.mark.parametrize("layout", ["eval_ep1", "eval_ep2", "eval_tp2", "eval_dense_tp2", "eval_top1_tied_ep2"])
def test_log_probs_match_hf(suite, layout):
    for rank in range(2):
        # fp32 on both sides; the remaining difference is summation order (measured ~5e-7).
        assert suite[rank][layout]["log_prob_error"] < 1e-4
        # Rows padded on the left and on the right (a response that ended early) alike. The attention masks only
        # the future (no padding mask, as Transformer Engine's causal attention and our SDPA run): token_log_probs
        # moves each row's valid tokens to the front, so no valid token can see padding.
        assert suite[rank][layout]["log_prob_error_both_sides"] < 1e-4


@pytest.mark.parametrize("layout", ["eval_ep1", "eval_ep2", "eval_tp2", "eval_dense_tp2", "eval_top1_tied_ep2"])
def test_export_round_trips_hf_state_dict(suite, layout):
    for rank in range(2):
        assert suite[rank][layout]["export_mismatches"] == []
        assert suite[rank][layout]["export_extra"] == []


def test_pipeline_stages_hold_half_the_layers_and_export_the_whole_model(suite):
    # Without a forward, on 2 processes (pp2 alone); test_megatron_pipeline.py runs the stages, tied embedding too.
    for rank in range(2):
        assert suite[rank]["export_pp2"]["local_layers"] == 1  # 2 layers over pp=2
        assert suite[rank]["export_pp2"]["export_mismatches"] == []  # every stage yields every tensor, bit for bit
        assert suite[rank]["export_pp2"]["export_extra"] == []


@pytest.mark.parametrize("layout", ["eval_ep1", "eval_ep2", "eval_tp2"])
def test_per_expert_export_matches_hf_expert_slices(suite, layout):
    hf_state = hm.tiny_hf_moe().state_dict()
    moe_ffn = hm.TINY_MOE["moe_intermediate_size"]
    exported = suite[0][layout]["per_expert"]
    assert len(exported) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for layer in range(2):
        gate_up = hf_state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = hf_state[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(4):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            assert torch.equal(exported[prefix + "gate_proj.weight"], gate_up[e, :moe_ffn])
            assert torch.equal(exported[prefix + "up_proj.weight"], gate_up[e, moe_ffn:])
            assert torch.equal(exported[prefix + "down_proj.weight"], down[e])


def test_gmpo_update_is_the_same_at_ep1_ep2_etp2_and_in_hf(suite):
    reference = hm.hf_policy_batch_update(hm.tiny_hf_moe())
    assert reference[0] > hm.UPDATE["clip_grad"]  # clipping is exercised
    for layout in ("update_ep1", "update_ep2", "update_etp2"):
        # Both ranks report the global norm; every clipped gradient, reduced over DP and gathered over EP, is HF's.
        for rank in range(2):
            hm.assert_same_update(suite[rank][layout], reference, f"{layout} rank {rank}")
    # Adam moves every weight by about lr = 1e-3, two orders above the tolerance, so the comparison means something.
    before, after = hm.tiny_hf_moe().state_dict(), reference[1]
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 5e-4


def test_dense_tp2_update_is_the_hf_update(suite):
    # Before the q/k norm gradients were summed over TP (megatron's finalize_model_grads), each TP rank stepped them
    # with its own heads' share: those four gradients were 60-83 % off, and the TP copies drifted apart.
    reference = hm.hf_policy_batch_update(hm.tiny_hf_dense())
    for rank in range(2):
        hm.assert_same_update(suite[rank]["update_dense_tp2"], reference, f"rank {rank}")


def test_the_load_balancing_loss_weighs_each_micro_batch_alike_with_and_without_pipeline_stages(suite):
    # Both layouts average 4 one-row micro-batches' aux losses: 1/2 per micro-batch on each of 2 replicas (then DDP's
    # mean), or 1/4 on the one replica. A per-micro-batch weight of 1 at EP2 would double its aux gradient.
    no_aux_norm = suite[0]["update_ep2"][0]["grad_norm"]
    for rank in range(2):
        ep2, pp2 = suite[rank]["aux_loss_ep2"], suite[rank]["aux_loss_pp2"]
        assert ep2[0]["grad_norm"] == pytest.approx(pp2[0]["grad_norm"], rel=1e-5)
        assert abs(ep2[0]["grad_norm"] - no_aux_norm) > 0.05  # measured 1.067 with the aux loss, 0.884 without
        for name, grad in ep2[2].items():
            torch.testing.assert_close(grad, pp2[2][name], atol=1e-8, rtol=1e-4, msg=name)
        for name, tensor in ep2[1].items():
            torch.testing.assert_close(tensor, pp2[1][name], atol=1e-6, rtol=0, msg=name)


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(suite):
    # megatron's bf16 optimizer would apply it (it checks only under fp16 loss scaling) and every weight would be NaN.
    before = hm.tiny_hf_moe().state_dict()
    for rank in range(2):
        metrics, after, _ = suite[rank]["update_ep2_nan_on_rank1"]
        assert metrics["update_skipped"] == 1.0 and math.isnan(metrics["grad_norm"])
        for name, tensor in after.items():
            assert torch.equal(tensor, before[name]), name  # not a weight moved, on either rank
    assert suite[0]["update_ep2"][0]["update_skipped"] == 0.0  # the same step with finite advantages is taken


def test_routing_replay_reuses_recorded_experts(suite):
    for rank in range(2):
        replay = suite[rank]["replay_ep2"]
        # Doubling the last router's weights keeps its top-k choices: replaying the recorded ones changes nothing.
        assert replay["doubled"] < 1e-6
        # Negating them changes the choices: free routing and replayed routing now give different log-probs.
        assert replay["negated"] > 1e-2


def test_megatron_optimizer_finds_its_gloo_data_parallel_groups(suite):
    # At EP=2 on 2 ranks: dense parameters are data-parallel over both ranks, each expert lives on one rank only.
    for rank in (0, 1):
        assert suite[rank]["optimizer_groups_ep2"] == {"intra_dp_cp_group_gloo": 2, "intra_expt_dp_group_gloo": 1}


def test_left_align_moves_each_rows_valid_tokens_to_the_front():
    from openrlhf_gmpo.megatron.logprobs import left_align

    ids = torch.tensor([[9, 9, 1, 2, 3, 0], [4, 5, 6, 7, 8, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    aligned, aligned_mask, shift = left_align(ids, mask)
    # Row 0 is rotated left by its 2 padding columns; row 1 has none on the left and stays.
    assert aligned.tolist() == [[1, 2, 3, 0, 9, 9], [4, 5, 6, 7, 8, 0]]
    assert aligned_mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert shift.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"row 1 .*padding between valid tokens \(\[1, 0, 1\]\)"):
        left_align(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 0, 1]]))
