"""Per-token log-probabilities from a megatron GPTModel whose logits stay sharded over the vocabulary (TP).

log p(token) = -cross_entropy(logits, token); megatron-core's `vocab_parallel_cross_entropy` computes it with a max
and a sum-of-exp all-reduced over the TP group, so no rank ever holds [tokens, full vocab] logits.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the valid tokens of each row (OpenRLHF left-pads prompts), as HF and OpenRLHF number them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean mask for megatron attention, True where a query must NOT see a key: future or padding.

    Passed explicitly because megatron's default causal mask is built on CUDA.
    """
    seq_len = attention_mask.shape[1]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).triu(1)
    padded_key = ~attention_mask.bool()[:, None, None, :]
    return future[None, None] | padded_key


def token_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-prob of each next token, [B, S-1] fp32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).

    For a single pipeline stage (the last stage computes logits); padded positions hold finite garbage.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    attention_mask = attention_mask.bool()
    seq_len = input_ids.shape[1]
    config = model.config
    if config.sequence_parallel and seq_len % config.tensor_model_parallel_size:
        # Sequence parallelism splits the sequence over TP ranks: right-pad to a multiple with masked tokens, which
        # come after every real token and so change nothing before them.
        pad = -seq_len % config.tensor_model_parallel_size
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad))
    logits = model(
        input_ids=input_ids,
        position_ids=position_ids_from_mask(attention_mask),
        attention_mask=causal_padding_mask(attention_mask),
        padding_mask=~attention_mask,  # keeps padding out of MoE routing statistics (aux loss, load metrics)
    )  # [B, S, V / tp]
    # The division also makes a fresh fp32 tensor, which the cross-entropy may modify in place.
    shifted = logits[:, : seq_len - 1].float() / temperature
    return -vocab_parallel_cross_entropy(shifted, input_ids[:, 1:seq_len].contiguous())
