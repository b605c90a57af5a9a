"""SDPAttention against megatron-core's own DotProductAttention (the local spec's core attention) on the same inputs:
grouped-query attention (4 heads, 2 KV groups), fp32, outputs and gradients."""

from __future__ import annotations

import helpers_megatron
import pytest
import torch

pytest.importorskip("megatron.core")
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from openrlhf_gmpo.megatron.parallel import ParallelSizes  # noqa: E402
from openrlhf_gmpo.megatron.sdpa_attention import SDPAttention  # noqa: E402

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 8, 7, 3


@pytest.fixture(scope="module")
def parallel():
    """megatron's groups and RNG tracker in a one-process gloo world, torn down after this module."""
    with helpers_megatron.one_process_world():
        yield


def _config(**overrides):
    fields = dict(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
                  attention_dropout=0.0, use_cpu_initialization=True)  # fmt: skip
    return TransformerConfig(**{**fields, **overrides})


@pytest.fixture
def cpu_buffers(monkeypatch):
    """megatron's attention takes its score buffer from a global pool on `torch.cuda.current_device()`: the CPU here."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _pair(config=None):
    kwargs = dict(config=config or _config(), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kwargs), SDPAttention(**kwargs)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=g)
    key, value = (torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    return query, key, value


def _run(module, qkv, mask):
    """Output [S, B, H*D] and the gradients of a fixed projection of it w.r.t. q, k, v."""
    leaves = [t.clone().requires_grad_() for t in qkv]
    out = module(*leaves, mask, attn_mask_type=AttnMaskType.causal)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def _causal(batch=BATCH):
    return torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None].expand(batch, 1, SEQ, SEQ)


def test_no_mask_is_causal_attention(parallel, cpu_buffers):
    reference, ours = _pair()
    qkv = _qkv()
    # megatron's local attention needs the causal mask spelled out on CPU (its default one is built on CUDA)
    expected, expected_grads = _run(reference, qkv, _causal())
    actual, grads = _run(ours, qkv, None)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_explicit_mask_hides_padding_like_megatrons(parallel, cpu_buffers):
    reference, ours = _pair()
    qkv = _qkv(1)
    valid = torch.ones(BATCH, SEQ, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    valid[1, -3:] = False  # right padding
    mask = _causal() | ~valid[:, None, None, :]  # True = masked: the future and padded keys
    expected, _ = _run(reference, qkv, mask)
    actual, grads = _run(ours, qkv, mask)
    # Queries that see at least one key match. Row 0's first two queries see nothing (all their keys are padding or
    # future): megatron averages over every key there, torch's SDPA gives 0; both finite, and padding either way.
    sees_something = (~mask).any(-1)[:, 0].T  # [S, B]
    torch.testing.assert_close(actual[sees_something], expected[sees_something], atol=1e-5, rtol=1e-5)
    assert not sees_something[:2, 0].any() and sees_something[2:, 0].all()
    assert torch.isfinite(actual).all() and all(torch.isfinite(g).all() for g in grads)


def test_unsupported_settings_are_refused_by_name(parallel):
    with pytest.raises(ValueError, match="does not implement attention dropout 0.1"):
        _pair(_config(attention_dropout=0.1))
    _, ours = _pair()
    query, key, value = _qkv()
    with pytest.raises(ValueError, match="as many queries as keys, got 1 and 7"):
        ours(query[:1], key, value, None, attn_mask_type=AttnMaskType.causal)


def test_the_local_spec_uses_it(parallel):
    from types import SimpleNamespace

    from openrlhf_gmpo.megatron.model import layer_spec

    spec = layer_spec(SimpleNamespace(num_experts=None), ParallelSizes(1), use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
