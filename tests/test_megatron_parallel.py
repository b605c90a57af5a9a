"""Pure parts of the megatron backend: parallel-size validation, config translation, weight-layout transforms."""

import math
import re

import pytest
import torch
from transformers import Qwen3MoeConfig

from openrlhf_gmpo.megatron.model import MoEOptions, transformer_config_kwargs
from openrlhf_gmpo.megatron.parallel import ParallelSizes, validate_parallel_sizes
from openrlhf_gmpo.megatron.weights import (
    fuse_qkv,
    local_spec_name,
    shard,
    shard_gated_fc1,
    split_qkv,
    unshard_gated_fc1,
)

# Qwen3-30B-A3B's numbers.
QWEN3_30B_A3B = dict(
    num_layers=48, num_attention_heads=32, num_kv_heads=4, vocab_size=151936, num_experts=128, moe_ffn_hidden_size=768
)


def test_qwen3_30b_a3b_layouts_are_valid():
    sizes = validate_parallel_sizes(ParallelSizes(8, ep=8), **QWEN3_30B_A3B)
    assert (sizes.dp, sizes.edp) == (8, 1)  # dense part replicated 8 ways, each expert held once
    sizes = validate_parallel_sizes(ParallelSizes(16, ep=8), **QWEN3_30B_A3B)
    assert (sizes.dp, sizes.edp) == (16, 2)
    sizes = validate_parallel_sizes(ParallelSizes(16, tp=2, ep=8, pp=2), **QWEN3_30B_A3B)
    assert (sizes.dp, sizes.edp) == (4, 1)  # 16 / (tp 2 * pp 2); 16 / (ep 8 * pp 2)


@pytest.mark.parametrize(
    "sizes, overrides, message",
    [
        (ParallelSizes(6, ep=4), {}, "world size 6 is not divisible by etp*ep*pp = 1*4*1"),
        (ParallelSizes(12, tp=3), {}, "32 attention heads are not divisible by tp=3"),
        (ParallelSizes(8, tp=8), {}, "4 KV heads (query groups) are not divisible by tp=8"),
        (ParallelSizes(24, ep=12), {}, "128 experts are not divisible by ep=12"),
        (ParallelSizes(40, pp=5), {}, "48 layers are not divisible by pp=5"),
        (ParallelSizes(10, tp=2), {"vocab_size": 151935}, "vocab size 151935 is not divisible by tp=2"),
        (ParallelSizes(10, tp=4), {}, "world size 10 is not divisible by tp*pp = 4*1"),
        (ParallelSizes(8, etp=5), {"moe_ffn_hidden_size": 770}, "world size 8 is not divisible by etp*ep*pp = 5*1*1"),
        (ParallelSizes(10, etp=5), {}, "expert FFN size 768 is not divisible by etp=5"),
        (ParallelSizes(8, ep=0), {}, "ep=0 must be a positive integer"),
        (ParallelSizes(8, ep=2), {"num_experts": None}, "ep=2 and etp=1 need a MoE model"),
    ],
)
def test_invalid_layouts_name_the_numbers(sizes, overrides, message):
    with pytest.raises(ValueError) as error:
        validate_parallel_sizes(sizes, **{**QWEN3_30B_A3B, **overrides})
    assert message in str(error.value)


def _moe_config(**overrides):
    base = dict(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
    )  # fmt: skip
    return Qwen3MoeConfig(**{**base, **overrides})


def test_router_translation_follows_norm_topk_prob():
    # norm_topk_prob=True: weights renormalised over the top-k = megatron's top-k-then-softmax (pre_softmax False).
    kwargs = transformer_config_kwargs(_moe_config(), ParallelSizes(1))
    assert kwargs["moe_router_pre_softmax"] is False
    assert kwargs["moe_router_dtype"] == "fp32" and kwargs["moe_router_load_balancing_type"] == "none"
    kwargs = transformer_config_kwargs(_moe_config(norm_topk_prob=False, num_experts_per_tok=1), ParallelSizes(1))
    assert kwargs["moe_router_pre_softmax"] is True and kwargs["moe_router_topk"] == 1
    kwargs = transformer_config_kwargs(_moe_config(), ParallelSizes(1), moe=MoEOptions(aux_loss_coef=1e-3))
    assert kwargs["moe_router_load_balancing_type"] == "aux_loss" and kwargs["moe_aux_loss_coeff"] == 1e-3


# Qwen3's long-context setting (its model cards' rope_scaling), as transformers 5 stores it.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6}


@pytest.mark.parametrize(
    "overrides, options, message",
    [
        ({"num_experts_per_tok": 1}, MoEOptions(), "num_experts_per_tok=1 with norm_topk_prob=True"),
        ({"mlp_only_layers": [1]}, MoEOptions(), "mlp_only_layers=[1]"),
        ({}, MoEOptions(router_dtype="bf16"), "router_dtype='bf16'"),
        ({}, MoEOptions(aux_loss_coef=-0.1), "aux_loss_coef=-0.1"),
        ({"hidden_act": "gelu"}, MoEOptions(), "hidden_act='gelu'"),
        ({"attention_bias": True}, MoEOptions(), "attention_bias=True"),
        ({"rope_parameters": YARN}, MoEOptions(), "rope_type='yarn' is not supported"),
    ],
)
def test_unsupported_configs_raise(overrides, options, message):
    with pytest.raises(ValueError) as error:
        transformer_config_kwargs(_moe_config(**overrides), ParallelSizes(1), moe=options)
    assert message in str(error.value)


def test_a_config_without_head_dim_uses_hidden_over_heads_as_hf_does():
    config = _moe_config()
    del config.head_dim  # config.json files may leave it out; HF then uses hidden_size // num_attention_heads
    assert transformer_config_kwargs(config, ParallelSizes(1))["kv_channels"] == 32 // 4


def test_fuse_qkv_groups_rows_per_kv_head():
    # 4 query heads, 2 KV heads, head_dim 1, hidden 1: row r of q is head r, so the fused order is readable.
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = fuse_qkv(q, k, v, num_heads=4, num_groups=2)
    # group 0: q heads 0,1, k0, v0; group 1: q heads 2,3, k1, v1
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    # TP=2 gives each rank whole groups.
    assert shard(fused, 2, 1, 0).flatten().tolist() == [2, 3, 11, 21]
    back = split_qkv(fused, num_heads=4, num_groups=2, head_dim=1)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_gated_fc1_shards_keep_gate_and_up_rows_together():
    gate = torch.arange(4.0)[:, None]  # rows 0..3
    up = torch.arange(10.0, 14.0)[:, None]  # rows 10..13
    shards = [shard_gated_fc1(gate, up, 2, r) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 10, 11]
    assert shards[1].flatten().tolist() == [2, 3, 12, 13]
    full_gate, full_up = unshard_gated_fc1(shards)
    assert torch.equal(full_gate, gate) and torch.equal(full_up, up)


def test_transformer_engine_names_map_to_local_names():
    assert (
        local_spec_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
        == "decoder.layers.3.input_layernorm.weight"
    )
    assert local_spec_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )
    assert local_spec_name("decoder.layers.1.mlp.experts.linear_fc2.weight17") == (
        "decoder.layers.1.mlp.experts.local_experts.17.linear_fc2.weight"
    )
    assert local_spec_name("decoder.layers.1.mlp.router.weight") == "decoder.layers.1.mlp.router.weight"


def test_lr_schedule_follows_openrlhf_cosine_with_min_lr_and_lr_mult():
    from openrlhf_gmpo.megatron.train import LRSchedule

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr_mult": 0.5}], lr=1.0)
    # 10 steps, warmup ratio 0.2 -> 2 warmup steps (0, 0.5, then 1.0); then cosine from 1.0 down to min 0.1:
    # step s >= 2: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 2) / 8)); s = 6 is halfway: 0.55.
    schedule = LRSchedule(optimizer, "cosine_with_min_lr", 1.0, total_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1)
    rates = []
    for _ in range(10):
        rates.append(schedule.lr)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * schedule.lr)  # megatron's per-group lr_mult
        schedule.step()
    assert rates[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert rates[6] == pytest.approx(0.55)
    assert rates[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_weight_decay_skips_biases_and_norms_on_the_cpu_optimizer():
    from openrlhf_gmpo.megatron.train import OptimizerOptions, TorchAdamW

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = TorchAdamW(model, OptimizerOptions(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    # megatron's default rule: matrices decay; biases and 1-D weights (the norm's weight) do not.
    assert [p.shape for p in decayed["params"]] == [(4, 4)] and decayed["weight_decay"] == 0.1
    assert [p.shape for p in plain["params"]] == [(4,), (4,), (4,)] and plain["weight_decay"] == 0.0


def test_lr_schedule_resumes_with_the_rate_of_the_step_it_stopped_at():
    from openrlhf_gmpo.megatron.train import LRSchedule

    def schedule_for(optimizer):
        # 7 steps, warmup ratio 0.2 -> ceil(1.4) = 2 warmup steps: rates 0, 0.5, then 1.0 (constant after warmup)
        return LRSchedule(optimizer, "constant_with_warmup", 1.0, total_steps=7, warmup_ratio=0.2, min_lr_ratio=0.0)

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    first = optimizer()
    schedule = schedule_for(first)
    rates = []
    for _ in range(3):
        rates.append(first.param_groups[0]["lr"])
        schedule.step()
    assert rates == [0.0, 0.5, 1.0]  # int(1.4) = 1 warmup step would give [0, 1, 1]
    resumed = optimizer()
    schedule_for(resumed).load_state_dict(schedule.state_dict())
    assert resumed.param_groups[0]["lr"] == 1.0  # the resumed step's rate, written at once (not 0, the fresh rate)
    with pytest.raises(ValueError, match="total_steps=0"):
        LRSchedule(optimizer(), "constant", 1.0, total_steps=0, warmup_ratio=0.0, min_lr_ratio=0.0)


def test_micro_batch_metrics_fold_into_means_and_extremes():
    from openrlhf_gmpo.megatron.train import _combine

    # policy_update's metrics over micro-batches: a mean for most keys, the extreme for *_min / *_max
    total = None
    for value in (1.0, 3.0):
        total = _combine("approx_kl", total, value, 2)
    assert total == 2.0
    low = high = None
    for value in (2.0, 1.0, 3.0):
        low, high = _combine("token_ratio_min", low, value, 3), _combine("token_ratio_max", high, value, 3)
    assert (low, high) == (1.0, 3.0)


def test_left_align_leaves_an_all_padding_row_alone():
    from openrlhf_gmpo.megatron.logprobs import left_align

    ids, mask, shift = left_align(torch.arange(6).reshape(2, 3), torch.tensor([[0, 1, 1], [0, 0, 0]]))
    assert shift.tolist() == [1, 0] and ids.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert mask.int().tolist() == [[1, 1, 0], [0, 0, 0]]


def test_routing_replay_refuses_a_batch_that_does_not_match_the_recording():
    from openrlhf_gmpo.megatron.routing_replay import join_per_sequence

    recorded = [torch.zeros(2, 3, 1, dtype=torch.long)]  # 2 layers, 3 tokens, top-1: one sequence
    with pytest.raises(ValueError, match="1 recorded sequences for a batch of 2"):
        join_per_sequence(recorded, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence 0: 3 recorded tokens, the mask has 2"):
        join_per_sequence(recorded, torch.tensor([[0, 1, 1]], dtype=torch.bool))


def test_parallel_size_must_be_an_int():
    with pytest.raises(ValueError, match=re.escape("tp=2.0 must be a positive integer")):
        validate_parallel_sizes(ParallelSizes(8, tp=2.0), **QWEN3_30B_A3B)


def test_expert_tp_needs_a_moe_model():
    with pytest.raises(ValueError, match=re.escape("ep=1 and etp=2 need a MoE model")):
        validate_parallel_sizes(ParallelSizes(8, etp=2), **{**QWEN3_30B_A3B, "num_experts": None})


def test_dense_ffn_size_is_checked_against_tp():
    from transformers import Qwen3Config

    from openrlhf_gmpo.megatron.parallel import sizes_for_hf_config

    # heads 4 and KV heads 2 split over tp=2; a dense FFN of 7 does not
    config = Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         intermediate_size=7, hidden_size=16)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("FFN size 7 is not divisible by tp=2")):
        sizes_for_hf_config(config, ParallelSizes(2, tp=2))


def test_edp_counts_expert_tp():
    assert ParallelSizes(16, ep=4, etp=2).edp == 2  # 16 / (2*4*1)


def test_hf_shapes_from_the_config_are_the_hf_models_shapes():
    # Pipeline stages that do not own a tensor allocate it from this shape before the owner broadcasts it.
    import helpers_megatron as hm

    from openrlhf_gmpo.megatron.weights import hf_shape

    # One model with head_dim 16, so that heads x head_dim (64) differs from hidden (32).
    for model in (hm.tiny_hf_moe(), hm.tiny_hf_moe_top1_tied(), hm.tiny_hf_dense(), hm.tiny_hf_moe(head_dim=16)):
        for name, tensor in model.state_dict().items():
            assert hf_shape(model.config, name) == tuple(tensor.shape), name
    # The per-expert (checkpoint, vLLM) names: gate/up [moe_ffn, hidden], down [hidden, moe_ffn].
    config = hm.tiny_hf_moe().config
    assert hf_shape(config, "model.layers.1.mlp.experts.3.gate_proj.weight") == (16, 32)
    assert hf_shape(config, "model.layers.1.mlp.experts.3.down_proj.weight") == (32, 16)
