"""Core attention for megatron-core's local (no Transformer Engine) layer spec, computed by torch's
`scaled_dot_product_attention`.

megatron's local `DotProductAttention` materialises every score and probability, [B, heads, S, S], and softmaxes them
in separate kernels: at S = 4096 with 32 heads that is 1 GB per sequence and layer in bf16, written and read several
times. SDPA runs the same function as one fused kernel (FlashAttention on Ampere/Hopper for a causal mask, the
memory-efficient kernel for an explicit one) with O(S) memory. Same constructor and forward signature, no
parameters, so checkpoints and the HF mapping are unchanged.

The fast path needs no mask: `token_log_probs` left-aligns every row, so the causal mask alone keeps each valid token
from seeing padding. An explicit boolean mask (True = masked, megatron's convention) is honoured too.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """`DotProductAttention` whose forward is one `F.scaled_dot_product_attention` call (see the module docstring)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, **kwargs)
        unsupported = [
            (self.softmax_offset is not None, f"softmax_type={config.softmax_type!r}"),
            (self.scale_mask_softmax.window_size is not None, f"window attention {config.window_size}"),
            (config.apply_query_key_layer_scaling, "apply_query_key_layer_scaling"),
            (self.attention_dropout.p > 0, f"attention dropout {self.attention_dropout.p}"),
        ]
        for present, what in unsupported:
            if present:
                raise ValueError(f"SDPAttention does not implement {what}; use megatron's DotProductAttention")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        """[sq, b, heads, d] query, [sk, b, groups, d] key/value -> [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        heads, groups = query.shape[2], key.shape[2]
        # Repeat the KV groups explicitly, as DotProductAttention does: SDPA's `enable_gqa` is not supported by
        # every fused kernel, and an unsupported input would silently run the unfused math kernel instead.
        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if attention_mask is None:
            causal = mask_type == AttnMaskType.causal
            if causal and q.shape[2] != k.shape[2]:  # SDPA aligns such a mask top-left, megatron's has to be square
                raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale)
        else:
            allowed = ~attention_mask.bool()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
