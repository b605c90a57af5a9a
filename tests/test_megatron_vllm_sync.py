"""The megatron actor's weight sync to vLLM engines (`vllm_sync.sync_weights`, the NCCL-broadcast path), on CPU.

What is real: the megatron model loaded from a tiny HF checkpoint, the streaming export, the sync loop, Ray's
remote calls and OpenRLHF's barrier helper. What is not: the receiving side. vLLM cannot run here, so each engine
is a Ray actor that records the `update_weight` / `reset_prefix_cache` calls OpenRLHF's vLLM worker would get, and
the NCCL group is an object that records what rank 0 broadcasts. The CUDA-IPC path needs GPUs: not covered here.
"""

from __future__ import annotations

import sys

import helpers_megatron as hm
import pytest
import ray
import torch

pytest.importorskip("megatron.core")
# The engine actors' class travels by value: workers need not import this test module (pytest names it
# tests.test_..., and OpenRLHF installs a `tests` package of its own that would shadow ours there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordingEngine:
    """The calls OpenRLHF's vLLM engine actor receives during a sync, in order."""

    def __init__(self):
        self.calls = []

    def update_weight(self, name, dtype, shape, empty_cache=False):
        self.calls.append(("update_weight", name, dtype, tuple(shape), empty_cache))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def recorded(self):
        return self.calls


class RecordingGroup:
    """Rank 0's end of the NCCL group: keeps each broadcast tensor."""

    def __init__(self):
        self.sent = []

    def broadcast(self, tensor, src, stream):
        assert src == 0 and stream is not None
        self.sent.append(tensor.clone())


def per_expert_hf_state(hf) -> dict[str, torch.Tensor]:
    """The HF model's weights under the names a checkpoint on disk (and vLLM's loader) uses: one tensor per expert
    projection instead of transformers' fused [E, 2F, H] / [E, H, F] experts."""
    state = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, ffn = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                state[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :ffn]
                state[f"{prefix}{e}.up_proj.weight"] = tensor[e, ffn:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                state[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = tensor[e]
        else:
            state[name] = tensor
    return state


def sync_once(hf, engines: int, reset_prefix_cache: bool):
    """Load `hf` into a megatron model in a one-process world, sync it to `engines` recording engines."""
    from openrlhf_gmpo.megatron import vllm_sync
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import ParallelSizes
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    with hm.one_process_world():
        model = build_gpt_model(hf.config, ParallelSizes(1))
        load_hf_weights(model, hf.state_dict(), hf.config)
        actors = [ray.remote(RecordingEngine).remote() for _ in range(engines)]
        group = RecordingGroup()
        vllm_sync.sync_weights(model, hf.config, actors, broadcast_group=group, reset_prefix_cache=reset_prefix_cache)
        count = vllm_sync.hf_weight_count(hf.config)
    return ray.get([a.recorded.remote() for a in actors]), group.sent, count


# Per layer: q, k, v, o, q_norm, k_norm and the two layer norms (8), then the router and 4 experts x (gate, up,
# down) for the MoE, or gate, up, down for the dense MLP; around the 2 layers: embedding, final norm, lm_head.
@pytest.mark.parametrize(
    "make_hf, expected_count",
    [
        (hm.tiny_hf_moe, 2 * (8 + 1 + 4 * 3) + 3),  # 45
        (hm.tiny_hf_moe_top1_tied, 2 * (8 + 1 + 4 * 3) + 2),  # 44: the tied lm_head is not sent
        (hm.tiny_hf_dense, 2 * (8 + 3) + 3),  # 25
    ],
    ids=["moe", "moe_top1_tied", "dense"],
)
def test_every_hf_weight_reaches_every_engine_once_in_bf16(local_ray, cpu_shims, make_hf, expected_count):
    hf = make_hf()
    calls, sent, count = sync_once(hf, engines=2, reset_prefix_cache=False)
    expected = per_expert_hf_state(hf)
    if hf.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # vLLM ties lm_head to the embedding itself
    assert count == len(expected) == len(sent) == expected_count

    for engine_calls in calls:
        assert engine_calls == calls[0]  # every engine is told the same
    names = [call[1] for call in calls[0]]
    assert sorted(names) == sorted(expected)  # each once, none extra
    for index, ((_, name, dtype, shape, empty_cache), tensor) in enumerate(zip(calls[0], sent, strict=True)):
        # The announced dtype and shape are the tensor that follows; vLLM asserts bf16.
        assert (dtype, shape) == (torch.bfloat16, tuple(tensor.shape)) and tensor.dtype == torch.bfloat16, name
        assert tensor.is_contiguous(), name
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
        assert empty_cache == (index == count - 1), name  # vLLM empties its cache after the last weight only


def test_prefix_cache_is_reset_once_per_sync_when_asked(local_ray, cpu_shims):
    calls, _, count = sync_once(hm.tiny_hf_moe(), engines=1, reset_prefix_cache=True)
    assert calls[0].count(("reset_prefix_cache",)) == 1
    assert len(calls[0]) == count + 1
