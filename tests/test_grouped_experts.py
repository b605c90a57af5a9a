"""GroupedExperts against megatron-core's own SequentialMLP, built from the same local spec with the same weights.

All tokens arrive sorted by expert, as the dispatcher hands them over: rows [0, 5) go to expert 0, none to expert 1,
[5, 14) to expert 2, [14, 16) to expert 3 -- uneven counts and an empty expert in one batch.
"""

from __future__ import annotations

from dataclasses import replace

import helpers_megatron
import pytest
import torch
import torch.nn.functional as F

megatron_core = pytest.importorskip("megatron.core")
from megatron.core.models.backends import LocalSpecProvider  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from openrlhf_gmpo.megatron.grouped_experts import (  # noqa: E402
    GroupedExperts,
    grouped_experts_submodule,
    stacked_view,
)

HIDDEN, EXPERT_FFN, NUM_EXPERTS = 32, 16, 4
UNEVEN = [5, 0, 9, 2]


@pytest.fixture(scope="module")
def pg_collection():
    """megatron's process groups in a one-process gloo world, torn down after this module."""
    with helpers_megatron.one_process_world():
        yield ProcessGroupCollection.use_mpu_process_groups()


def make_config(**overrides) -> TransformerConfig:
    """Qwen3-MoE-like experts: SwiGLU, no biases; megatron's unfused activation unless overridden."""
    fields = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=EXPERT_FFN,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    return TransformerConfig(**{**fields, **overrides})


def build_pair(config, pg_collection, device="cpu", dtype=torch.float32):
    """SequentialMLP from megatron's local spec, and GroupedExperts holding the very same weights."""
    torch.manual_seed(0)
    experts = config.num_moe_experts
    sequential = LocalSpecProvider().grouped_mlp_modules(False)(experts, config, pg_collection=pg_collection)
    grouped = grouped_experts_submodule()(experts, config, pg_collection=pg_collection)
    with torch.no_grad():  # std 1/sqrt(fan_in) instead of megatron's 0.02, so activations and outputs are O(1)
        for param in sequential.parameters():
            param.normal_(0.0, param.shape[-1] ** -0.5)
    grouped.load_state_dict(sequential.state_dict())
    return sequential.to(device, dtype), grouped.to(device, dtype)


def make_batch(counts, device="cpu", dtype=torch.float32, seed=1, hidden_size=HIDDEN):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(counts)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)
    probs = torch.rand(tokens, generator=generator).to(device)  # the router's fp32 probs
    grad_out = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)
    return hidden, torch.tensor(counts), probs, grad_out


def forward_backward(experts, hidden, tokens_per_expert, probs, grad_out):
    """Output and every gradient (input, probs, each expert weight) of one fwd+bwd."""
    hidden = hidden.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    output, bias = experts(hidden, tokens_per_expert, probs)
    assert bias is None
    output.backward(grad_out)
    grads = {name: param.grad for name, param in experts.named_parameters()}
    return output.detach(), hidden.grad, probs.grad, grads


def result_pairs(expected, actual) -> list[tuple]:
    """(what, sequential's, grouped's) for the output, the input and probs grads, and every weight grad."""
    (out_e, dx_e, dp_e, dw_e), (out_a, dx_a, dp_a, dw_a) = expected, actual
    assert dw_e.keys() == dw_a.keys()
    pairs = [("output", out_e, out_a), ("input grad", dx_e, dx_a), ("probs grad", dp_e, dp_a)]
    return pairs + [(name, dw_e[name], dw_a[name]) for name in dw_e]


def max_differences(expected, actual) -> dict[str, float]:
    """Largest |grouped - sequential| of the output, the input and probs grads, and over all weight grads."""
    pairs = result_pairs(expected, actual)
    largest = {what: (got.float() - want.float()).abs().max().item() for what, want, got in pairs}
    named = {what: largest.pop(what) for what in ("output", "input grad", "probs grad")}
    return {**named, "weight grads": max(largest.values())}


def assert_same_results(expected, actual, **tolerance):
    for what, want, got in result_pairs(expected, actual):
        # SequentialMLP leaves an empty expert's grads at zero too: its matmuls run on 0 rows.
        assert got is not None, what
        if tolerance:
            torch.testing.assert_close(got, want, **tolerance, msg=lambda m, w=what: f"{w}: {m}")
        else:
            assert torch.equal(got, want), f"{what} differs by {(got - want).abs().max()}"


def test_parameter_names_and_shapes_are_sequential_mlps(pg_collection, cpu_shims):
    sequential, grouped = build_pair(make_config(), pg_collection)
    shapes = {name: tuple(p.shape) for name, p in sequential.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in grouped.named_parameters()}
    # gate and up stacked in fc1: [2 * 16, 32]; fc2: [32, 16]
    assert shapes["local_experts.3.linear_fc1.weight"] == (2 * EXPERT_FFN, HIDDEN)
    assert shapes["local_experts.3.linear_fc2.weight"] == (HIDDEN, EXPERT_FFN)
    assert isinstance(grouped, GroupedExperts)


def test_expert_weights_are_views_of_one_tensor_also_after_to(pg_collection, cpu_shims):
    _, grouped = build_pair(make_config(), pg_collection)
    for dtype in (torch.float32, torch.bfloat16):
        grouped.to(dtype)
        fc1 = [expert.linear_fc1.weight for expert in grouped.local_experts]
        view = stacked_view(fc1)
        assert view is not None and view.shape == (NUM_EXPERTS, 2 * EXPERT_FFN, HIDDEN) and view.dtype == dtype
        assert torch.equal(view[2], fc1[2])
        # the view reads the Parameter's memory: a write to the Parameter shows through
        with torch.no_grad():
            fc1[2][0, 0] = 7.0
        assert view[2, 0, 0] == 7.0


def test_distributed_optimizer_buffer_keeps_the_strided_view(pg_collection, cpu_shims):
    """megatron DDP with the distributed optimizer moves every weight into its buffer, in reverse parameter order."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = make_config()
    sequential, grouped = build_pair(config, pg_collection)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=grouped)
    for name in ("linear_fc1", "linear_fc2"):
        weights = [getattr(expert, name).weight for expert in grouped.local_experts]
        assert ddp.buffers[0].param_data.data_ptr() <= weights[0].data_ptr() < weights[-1].data_ptr()  # moved
        assert stacked_view(weights) is not None, name
    grouped.run_grouped_on_cpu = True
    hidden, tokens_per_expert, probs, grad_out = make_batch(UNEVEN)
    ddp(hidden, tokens_per_expert, probs)[0].backward(grad_out)
    expected = forward_backward(sequential, hidden, tokens_per_expert, probs, grad_out)[3]
    for name, param in grouped.named_parameters():  # DDP's hooks moved each expert's grad slice into main_grad
        torch.testing.assert_close(param.main_grad, expected[name], atol=1e-5, rtol=1e-5)
    # only the iteration order of parameters changes, for that buffer; state_dict keeps megatron's order
    assert list(grouped.state_dict()) == list(sequential.state_dict())
    assert next(grouped.parameters()) is grouped.local_experts[NUM_EXPERTS - 1].linear_fc1.weight


def test_state_dict_loads_both_ways(pg_collection, cpu_shims):
    config = make_config()
    sequential, grouped = build_pair(config, pg_collection)
    torch.manual_seed(5)
    other = grouped_experts_submodule()(NUM_EXPERTS, config, pg_collection=pg_collection)
    assert not torch.equal(other.local_experts[0].linear_fc1.weight, grouped.local_experts[0].linear_fc1.weight)
    sequential.load_state_dict(other.state_dict())
    grouped.load_state_dict(sequential.state_dict())
    wanted = {name: param for name, param in other.named_parameters()}
    assert wanted.keys() == dict(sequential.named_parameters()).keys() == dict(grouped.named_parameters()).keys()
    for module in (sequential, grouped):
        for name, param in module.named_parameters():
            assert torch.equal(param, wanted[name]), name
    # load_state_dict copies in place, so the weights are still one tensor for the grouped GEMM
    assert stacked_view([expert.linear_fc2.weight for expert in grouped.local_experts]) is not None


def test_cpu_fallback_is_sequential_mlp_exactly(pg_collection, cpu_shims):
    sequential, grouped = build_pair(make_config(), pg_collection)
    batch = make_batch(UNEVEN)
    assert grouped.fallback_reason(batch[0]) == "grouped_mm is not used on CPU"
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch))


@pytest.mark.parametrize(
    "counts",
    [UNEVEN, [16, 0, 0, 0], [0, 0, 0, 0]],
    ids=["uneven-with-empty-expert", "all-to-one-expert", "no-tokens"],
)
def test_grouped_path_matches_sequential_mlp_fp32(pg_collection, cpu_shims, counts):
    sequential, grouped = build_pair(make_config(), pg_collection)
    grouped.run_grouped_on_cpu = True
    batch = make_batch(counts)
    assert grouped.fallback_reason(batch[0]) is None
    # the same products summed in a possibly different order: fp32 rounding only
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch), atol=1e-5, rtol=1e-5)


def test_grouped_path_matches_sequential_mlp_bf16(pg_collection, cpu_shims):
    sequential, grouped = build_pair(make_config(), pg_collection, dtype=torch.bfloat16)
    grouped.run_grouped_on_cpu = True
    batch = make_batch(UNEVEN, dtype=torch.bfloat16)
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4 %); values here are O(1), sums over <= 32 terms
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch), atol=1e-2, rtol=2e-2)


def test_fused_swiglu_config_matches(pg_collection, cpu_shims):
    # bias_activation_fusion=True: both sides use megatron's weighted_bias_swiglu_impl
    sequential, grouped = build_pair(make_config(bias_activation_fusion=True), pg_collection)
    grouped.run_grouped_on_cpu = True
    batch = make_batch(UNEVEN)
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [dict(activation_func_clamp_value=0.5), dict(gated_linear_unit=False, activation_func=F.gelu)],
    ids=["clamped-swiglu", "gelu"],
)
def test_other_activations_match(pg_collection, cpu_shims, overrides):
    # the unfused branch of megatron's expert MLP, mirrored by GroupedExperts for everything but plain SwiGLU
    sequential, grouped = build_pair(make_config(**overrides), pg_collection)
    grouped.run_grouped_on_cpu = True
    batch = make_batch(UNEVEN)
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch), atol=1e-5, rtol=1e-5)


def test_scattered_weights_fall_back_to_a_stacked_copy(pg_collection, cpu_shims):
    sequential, grouped = build_pair(make_config(), pg_collection)
    grouped.run_grouped_on_cpu = True
    fc1 = [expert.linear_fc1.weight for expert in grouped.local_experts]
    assert stacked_view(fc1[::-1]) is None  # reverse order (megatron DDP's param buffer) is not a strided view
    batch = make_batch(UNEVEN)
    forward_backward(grouped, *batch)  # caches the strided view, which must not be used once the weights move
    for expert in grouped.local_experts:  # each weight in its own storage, as DDP or a user may leave them
        old_memory = expert.linear_fc1.weight.data
        expert.linear_fc1.weight.data = old_memory.clone()
        old_memory.fill_(float("nan"))  # a stale view would now read NaN
    assert stacked_view([expert.linear_fc1.weight for expert in grouped.local_experts]) is None
    assert_same_results(forward_backward(sequential, *batch), forward_backward(grouped, *batch), atol=1e-5, rtol=1e-5)


def test_unsupported_config_runs_sequential_mlp(pg_collection, cpu_shims):
    sequential, grouped = build_pair(make_config(add_bias_linear=True), pg_collection)
    grouped.run_grouped_on_cpu = True
    hidden, tokens_per_expert, probs, _ = make_batch(UNEVEN)
    assert "add_bias_linear" in grouped.fallback_reason(hidden)
    # forward only: megatron's own biased expert MLP adds its bias in place on a custom Function's output, which
    # autograd rejects on this path (SequentialMLP itself, not ours)
    with torch.no_grad():
        expected, _ = sequential(hidden, tokens_per_expert, probs)
        actual, _ = grouped(hidden, tokens_per_expert, probs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moe_layer_with_grouped_experts_matches_local_spec(pg_collection, request, device):
    """The whole MoELayer (router, alltoall dispatcher, experts, combine) with GroupedExperts swapped into the spec."""
    if device == "cpu":
        request.getfixturevalue("cpu_shims")
    config = make_config(moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32")
    spec_kwargs = dict(num_experts=NUM_EXPERTS, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm")
    torch.manual_seed(0)
    reference = get_gpt_layer_local_spec(**spec_kwargs).submodules.mlp(config=config, pg_collection=pg_collection)
    moe_spec = get_gpt_layer_local_spec(**spec_kwargs).submodules.mlp
    moe_spec.keywords["submodules"] = replace(moe_spec.keywords["submodules"], experts=grouped_experts_submodule())
    layer = moe_spec(config=config, pg_collection=pg_collection)
    layer.load_state_dict(reference.state_dict())
    assert isinstance(layer.experts, GroupedExperts)
    layer.experts.run_grouped_on_cpu = True
    reference, layer = reference.to(device), layer.to(device)

    hidden = torch.randn(6, 2, HIDDEN, generator=torch.Generator().manual_seed(3)).to(device)  # [seq, batch, hidden]
    results = []
    for module in (reference, layer):
        x = hidden.clone().requires_grad_()
        output, _ = module(x)
        output.square().sum().backward()
        results.append((output.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out_ref, dx_ref, dw_ref), (out, dx, dw) = results
    # fp32 on both devices (on CUDA grouped_mm's fp32 path; TF32 is off by default for matmuls)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert dw.keys() == dw_ref.keys()
    for name in dw_ref:  # includes the router weight
        torch.testing.assert_close(dw[name], dw_ref[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_grouped_matches_sequential_mlp(pg_collection, dtype, record_property):
    """On CUDA the grouped path is the default; bf16 takes grouped_mm's fast kernel."""
    sequential, grouped = build_pair(make_config(), pg_collection, device="cuda", dtype=dtype)
    batch = make_batch(UNEVEN, device="cuda", dtype=dtype)
    assert grouped.fallback_reason(batch[0]) is None
    tolerance = dict(atol=1e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    # fp32 matmuls without TF32 (torch's default, made sure of). Not monkeypatch: pytest 9.2 undoes a patch of this
    # computed attribute with delattr, which torch's cuBLAS settings object does not support.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected, actual = forward_backward(sequential, *batch), forward_backward(grouped, *batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    record_property("max_abs_diff", max_differences(expected, actual))
    assert_same_results(expected, actual, **tolerance)


@pytest.mark.gpu
def test_gpu_many_experts_bf16(pg_collection, record_property):
    """A wider layer on the fast bf16 kernel: 16 experts (4 of them empty), hidden 512, expert FFN 256."""
    config = make_config(hidden_size=512, moe_ffn_hidden_size=256, num_moe_experts=16, bias_activation_fusion=True)
    sequential, grouped = build_pair(config, pg_collection, device="cuda", dtype=torch.bfloat16)
    counts = [0, 37, 300, 1, 0, 64, 129, 0, 5, 700, 16, 0, 33, 2, 255, 90]
    batch = make_batch(counts, device="cuda", dtype=torch.bfloat16, hidden_size=512)
    assert grouped.fallback_reason(batch[0]) is None
    # weight grads sum over up to 700 tokens: allow a few bf16 steps on O(10) values
    expected, actual = forward_backward(sequential, *batch), forward_backward(grouped, *batch)
    record_property("max_abs_diff", max_differences(expected, actual))
    assert_same_results(expected, actual, atol=5e-2, rtol=3e-2)
    for index in (0, 4, 7, 11):  # experts without tokens get exactly zero gradient
        assert not actual[3][f"local_experts.{index}.linear_fc1.weight"].any()
