"""Per-token log-probabilities from a megatron GPTModel whose logits stay sharded over the vocabulary (TP).

log p(token) = -cross_entropy(logits, token); megatron-core's `vocab_parallel_cross_entropy` computes it with a max
and a sum-of-exp all-reduced over the TP group, so no rank ever holds [tokens, full vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Each row rotated so its valid tokens start at column 0: (ids, mask, shift), shift = the row's left padding.

    OpenRLHF rows are a left-padded prompt and a right-padded response: one contiguous run of valid tokens. Moved to
    the front, a plain causal mask already keeps every valid token from seeing padding, which is what Transformer
    Engine's causal attention applies (it ignores an explicit mask for `attn_mask_type=causal`); and positions 0, 1,
    2, ... are HF's, whether or not the attention uses `position_ids` (megatron's RoPE does not).
    """
    mask = attention_mask.bool()
    seq_len = mask.shape[1]
    lengths = mask.sum(1)
    shift = mask.int().argmax(1)  # the first valid column; 0 for a row without valid tokens
    last = seq_len - 1 - mask.flip(1).int().argmax(1)
    gaps = (lengths > 0) & (last - shift + 1 != lengths)
    if gaps.any():
        row = int(gaps.nonzero()[0, 0])
        raise ValueError(
            f"row {row} of the attention mask has padding between valid tokens ({mask[row].int().tolist()}); "
            "expected a left-padded prompt followed by a right-padded response"
        )
    columns = torch.arange(seq_len, device=mask.device)
    aligned_ids = input_ids.gather(1, (columns + shift[:, None]) % seq_len)
    return aligned_ids, aligned_mask(mask), shift


def aligned_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask after `left_align`: each row's valid tokens in its first columns."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return columns < attention_mask.bool().sum(1, keepdim=True)


@dataclass(frozen=True)
class ModelInputs:
    """A batch as the model takes it (rows left-aligned, padded for sequence parallelism), and how to map back."""

    input_ids: torch.Tensor  # (B, S') left-aligned; S' >= seq_len
    attention_mask: torch.Tensor  # (B, S') bool, each row's valid tokens first
    shift: torch.Tensor  # (B,) each row's left padding in the caller's columns
    seq_len: int  # the caller's S

    def run(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's output: vocab-sharded logits [B, S', V / tp] on the last pipeline stage, hidden states on
        others (whose input is the previous stage's output, set by megatron's pipeline schedule)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(self.input_ids)
        return model(
            input_ids=self.input_ids,
            position_ids=positions,
            # Rows are left-aligned, so the causal mask alone is exact: what TE and our SDPA attention apply.
            attention_mask=None,
            padding_mask=~self.attention_mask,  # keeps padding out of MoE routing statistics (aux loss, load)
        )


def model_inputs(config, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ModelInputs:
    """`input_ids` and `attention_mask` (B, S) as the model takes them, for a model with this TransformerConfig."""
    seq_len = input_ids.shape[1]
    input_ids, attention_mask, shift = left_align(input_ids, attention_mask)
    if config.sequence_parallel and seq_len % config.tensor_model_parallel_size:
        # Sequence parallelism splits the sequence over TP ranks: right-pad to a multiple with masked tokens, which
        # come after every real token and so change nothing before them.
        pad = -seq_len % config.tensor_model_parallel_size
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad))
    return ModelInputs(input_ids, attention_mask, shift, seq_len)


def log_probs_from_logits(logits: torch.Tensor, inputs: ModelInputs, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each next token, [B, S-1] fp32 in the caller's columns, from the model's logits for `inputs`.
    `logits` is consumed: the caller must not use it afterwards."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    seq_len = inputs.seq_len
    # One fresh fp32 copy (the cross-entropy works on it in place), divided in place, and the bf16 logits dropped:
    # 6 bytes per token per vocabulary entry at the peak instead of 10 (docs/megatron.md, memory plan).
    shifted = logits[:, : seq_len - 1].to(torch.float32, copy=True)
    del logits
    if temperature != 1.0:
        shifted.div_(temperature)
    aligned = -vocab_parallel_cross_entropy(shifted, inputs.input_ids[:, 1:seq_len].contiguous())
    # Back to the caller's columns: entry t predicts token t+1, which sits at t - shift in the aligned row.
    columns = torch.arange(seq_len - 1, device=aligned.device)
    return aligned.gather(1, (columns - inputs.shift[:, None]) % (seq_len - 1))


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")


def token_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-prob of each next token, [B, S-1] fp32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).

    For a single pipeline stage (the last stage computes logits; `pipeline.py` runs several); padded positions hold
    finite garbage.
    """
    check_temperature(temperature)
    inputs = model_inputs(model.config, input_ids, attention_mask)
    return log_probs_from_logits(inputs.run(model), inputs, temperature)
