"""Qwen3-MoE models for CountDown, after the GMPO paper's ~200M MoE (8 experts, 1 active per token).

Both sizes are the standard `Qwen3MoeForCausalLM` architecture, so OpenRLHF, vLLM and our megatron backend load them
like any Qwen3-MoE checkpoint. Routing is top-1 with norm_topk_prob=False: renormalising a single probability would
make the routing weight a constant 1.0 and cut the router off from the loss gradient (it is also megatron-core's
pre-softmax top-1). Router logits are not returned by default (output_router_logits=False); OpenRLHF's Actor turns
them on for any MoE model and adds the load-balancing loss only with --actor.aux_loss_coef > 0 (off in the RL setups
of verl and slime).
"""

SIZES = {
    # 196.7M-class: hidden 512, 10 layers, 8 heads / 4 KV heads of dim 64, 8 experts with FFN 1536, top-1.
    "200m": dict(
        hidden_size=512,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        moe_intermediate_size=1536,
    ),
    # ~2.6M: trains on 2 CPU cores in minutes; same expert layout.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=192,
    ),
}
NUM_EXPERTS = 8
EXPERTS_PER_TOKEN = 1
MAX_POSITIONS = 512  # prompts are ~26 tokens and worked solutions ~60: a wide margin for RL exploration


def model_config(size: str, vocab_size: int, *, pad_token_id: int | None = None, eos_token_id: int | None = None):
    """The transformers.Qwen3MoeConfig of a CountDown model; size is "tiny" or "200m"."""
    from transformers import Qwen3MoeConfig

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    shape = SIZES[size]
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        intermediate_size=shape["moe_intermediate_size"],  # unused: every layer is sparse (no mlp_only_layers)
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        norm_topk_prob=False,
        output_router_logits=False,
        decoder_sparse_step=1,
        tie_word_embeddings=True,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        **shape,
    )


def build_model(size: str, vocab_size: int, seed: int, **token_ids):
    """A randomly initialised transformers.Qwen3MoeForCausalLM (fp32); the same seed gives the same weights.

    The global torch RNG is left as it was (the seed is applied inside a forked RNG state).
    """
    import torch
    from transformers import Qwen3MoeForCausalLM

    config = model_config(size, vocab_size, **token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
    return model


def to_low_precision(model, dtype):
    """`model.to(dtype)` for the weights, with the RoPE frequency buffers kept fp32.

    `from_pretrained(dtype=torch.bfloat16)` keeps them fp32, as do vLLM and megatron; a plain `.to(bf16)` rounds them
    (relative error 2^-9), which turns the highest frequency's angle at position 100 by ~0.2 rad: a different
    positional encoding from the one the rest of the pipeline computes.
    """
    rotary = model.model.rotary_emb
    frequencies = {name: buffer for name, buffer in rotary.named_buffers(recurse=False) if "inv_freq" in name}
    model = model.to(dtype=dtype)
    for name, buffer in frequencies.items():
        setattr(rotary, name, buffer)
    return model


def count_parameters(config) -> int:
    """Unique parameters of a config's model, counted from the shapes (no weights allocated; tied embedding once)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model, tokenizer, out_dir: str, dtype: str = "bfloat16") -> None:
    """Save weights as safetensors plus the tokenizer; the caller's model is left as it is (a copy is converted).

    bf16 by default: vLLM's weight sync asserts bf16, and OpenRLHF loads in bf16 anyway.
    """
    import copy

    import torch

    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
