"""Build a megatron-core GPTModel equivalent to a HF Qwen3 / Qwen3-MoE config.

The config translation is a pure function (`transformer_config_kwargs`) so it can be checked without process groups;
`build_gpt_model` then picks the layer spec (Transformer Engine when installed, megatron's local modules otherwise)
and instantiates this rank's share of the model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

import torch

from openrlhf_gmpo.megatron.parallel import ParallelSizes, sizes_for_hf_config


@dataclass(frozen=True)
class MoEOptions:
    router_dtype: str = "fp32"  # softmax/top-k in fp32: bf16 router logits flip expert choices between passes
    aux_loss_coef: float = 0.0  # load-balancing loss is off for RL by default (verl and slime do the same)
    routing_replay: bool = False  # record experts in the old-policy pass, reuse them in the update


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def is_moe_config(hf_config) -> bool:
    return bool(getattr(hf_config, "num_experts", 0))


def head_dim(hf_config) -> int:
    """Qwen3 configs name head_dim (128 with hidden 2048 and 32 heads); HF falls back to hidden / heads without it."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _rope_parameters(hf_config) -> dict:
    return getattr(hf_config, "rope_parameters", None) or {}


def _rope_theta(hf_config) -> float:
    return float(_rope_parameters(hf_config).get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def transformer_config_kwargs(
    hf_config,
    sizes: ParallelSizes,
    *,
    moe: MoEOptions = MoEOptions(),
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
) -> dict:
    """TransformerConfig arguments for a HF Qwen3(-MoE) config; raises ValueError for what we cannot reproduce."""
    sizes_for_hf_config(hf_config, sizes)
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not a Qwen3 config; the megatron backend does not map QKV biases")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}: the megatron backend maps SwiGLU (silu) only")
    rope_type = _rope_parameters(hf_config).get("rope_type", "default")
    if rope_type != "default":  # e.g. YaRN for long context: megatron's plain RoPE would encode positions differently
        raise ValueError(f"rope_type={rope_type!r} is not supported by the megatron backend (only default)")
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels need CUDA/Apex; the unfused paths compute the same thing.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        # megatron's MoE layer refuses to train with TP but without sequence parallelism, and only Transformer
        # Engine's norms support it; without TE, TP > 1 is evaluation-only (validate_megatron_args).
        sequence_parallel=sizes.tp > 1 and has_transformer_engine(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        # Micro-batches differ in length: pipeline stages send each other the shape before the activations.
        variable_seq_lengths=sizes.pp > 1,
        # megatron refuses variable lengths with its default (allgather) MoE dispatcher, dense models too.
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # every weight is overwritten from the HF checkpoint
    )
    if recompute:
        # Keep only each layer's input and recompute the layer in the backward (see docs/megatron.md's memory plan).
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if is_moe_config(hf_config):
        if getattr(hf_config, "mlp_only_layers", []) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise ValueError(
                f"mlp_only_layers={hf_config.mlp_only_layers} decoder_sparse_step={hf_config.decoder_sparse_step}: "
                "the megatron backend maps models whose every layer is MoE"
            )
        top_k = hf_config.num_experts_per_tok
        if top_k == 1 and hf_config.norm_topk_prob:
            # HF then weights the chosen expert by exactly 1; megatron's top-1 router always uses softmax-then-top-k.
            raise ValueError("num_experts_per_tok=1 with norm_topk_prob=True has no megatron-core equivalent")
        if moe.router_dtype not in ("fp32", "fp64"):
            raise ValueError(f"router_dtype={moe.router_dtype!r}: choose fp32 or fp64")
        if moe.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef={moe.aux_loss_coef} must be >= 0")
        kwargs.update(
            num_moe_experts=hf_config.num_experts,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_router_topk=top_k,
            # norm_topk_prob=True renormalises the top-k softmax weights = megatron's top-k-then-softmax;
            # False keeps the full-softmax weights = megatron's pre-softmax.
            moe_router_pre_softmax=not hf_config.norm_topk_prob,
            moe_router_dtype=moe.router_dtype,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coef,
            moe_grouped_gemm=has_transformer_engine(),
            moe_permute_fusion=False,
            moe_enable_routing_replay=moe.routing_replay,
        )
    return kwargs


def layer_spec(hf_config, sizes: ParallelSizes, use_te: bool | None = None):
    """Transformer Engine spec when TE is installed; otherwise megatron's local modules, with torch SDPA as the core
    attention, and our grouped-GEMM experts on CUDA (ETP 1) or megatron's SequentialMLP (one expert at a time) on
    CPU."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = has_transformer_engine() if use_te is None else use_te
    num_experts = hf_config.num_experts if is_moe_config(hf_config) else None
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=True
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    use_sdpa_attention(spec)
    if num_experts is not None and torch.cuda.is_available() and sizes.etp == 1:
        use_grouped_experts(spec)
    return spec


def use_sdpa_attention(spec) -> None:
    """Swap megatron's unfused local DotProductAttention for openrlhf_gmpo.megatron.sdpa_attention (no parameters)."""
    from openrlhf_gmpo.megatron.sdpa_attention import SDPAttention

    spec.submodules.self_attention.submodules.core_attention = SDPAttention


def use_grouped_experts(spec) -> None:
    """Swap SequentialMLP for openrlhf_gmpo.megatron.grouped_experts in a local layer spec (same parameter names)."""
    from openrlhf_gmpo.megatron.grouped_experts import grouped_experts_submodule

    moe = spec.submodules.mlp  # functools.partial(MoELayer, submodules=MoESubmodules(...))
    moe.keywords["submodules"] = replace(moe.keywords["submodules"], experts=grouped_experts_submodule())


def build_gpt_model(
    hf_config,
    sizes: ParallelSizes,
    *,
    moe: MoEOptions = MoEOptions(),
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    use_te: bool | None = None,
):
    """This rank's GPTModel (its pipeline stage, TP shard and local experts). Parallel state must be initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = transformer_config_kwargs(hf_config, sizes, moe=moe, params_dtype=params_dtype, recompute=recompute)
    config = TransformerConfig(**kwargs)
    if moe.routing_replay:
        if config.sequence_parallel:
            raise ValueError(f"routing replay needs the whole sequence on each rank (no sequence parallelism): {sizes}")
        from megatron.core.transformer.moe.router_replay import RouterReplay

        # Routers register in one process-wide list; it must hold exactly this model's routers, in layer order.
        RouterReplay.clear_global_router_replay_instances()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(hf_config, sizes, use_te),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf_config),
        parallel_output=True,  # keep logits vocab-sharded; log-probs never gather the full vocabulary
    )
    _norms_to(model, params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def _norms_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The local spec's RMSNorms in the model's dtype. Without Apex megatron builds them as torch.nn.RMSNorm, which
    ignores `params_dtype`: fp32 norm weights in a bf16 model keep torch from its fused RMSNorm kernel, add an fp32
    gradient buffer, differ from the HF and vLLM models (bf16 norm weights) and from TE's norms, and break megatron's
    optimizer-state loading (training_state._load_parameter_state)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)
