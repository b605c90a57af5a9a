"""Expert tensor parallelism together with expert parallelism (ETP2 x EP2, DP4 for the dense part), on 4 gloo CPU
processes: each of the 4 experts is split over the 2 ranks of an ETP group, and the 2 ETP groups hold 2 experts each.

Against a tiny HF Qwen3-MoE in one process: log-probs, the streaming export, and one GMPO update (clipped gradients,
AdamW) with each rank on a quarter of the batch. ETP and EP are each tested alone in test_megatron_distributed.py.
"""

import helpers_megatron as hm
import helpers_megatron_expert_tp as hx
import pytest


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return hm.spawn_suite(hx.expert_tp_suite_worker, 4, tmp_path_factory.mktemp("megatron_expert_tp"))


def test_each_expert_is_split_over_two_ranks_and_the_experts_over_two_more(suite):
    for rank in range(4):
        groups = suite[rank]["groups"]
        assert len(groups["expert_tensor"]) == 2 and len(groups["expert_model"]) == 2
        assert set(groups["expert_tensor"]).isdisjoint(set(groups["expert_model"]) - {rank})
        assert groups["data_parallel"] == [0, 1, 2, 3]  # TP 1: the dense part is replicated on all four


def test_log_probs_and_export_match_hf(suite):
    for rank in range(4):
        result = suite[rank]["eval"]
        assert result["log_prob_error"] < 1e-4  # fp32 both sides, summation order only (measured 4.8e-7)
        assert result["log_prob_error_both_sides"] < 1e-4
        assert result["export_mismatches"] == [] and result["export_extra"] == []


def test_gmpo_update_is_the_hf_update(suite):
    reference = hm.hf_policy_batch_update(hm.tiny_hf_moe())
    assert reference[0] > hm.UPDATE["clip_grad"]  # the clip is exercised (grad norm 0.88447 on both sides)
    for rank in range(4):
        hm.assert_same_update(suite[rank]["update"], reference, f"rank {rank}")
