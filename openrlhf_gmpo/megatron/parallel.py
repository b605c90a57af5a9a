"""Parallel layout of the megatron backend: checking the sizes, and setting up megatron-core's process groups.

megatron-core splits the world twice over the same ranks: the dense part (attention, norms, embeddings) as
TP x DP x PP, the MoE experts as ETP x EP x EDP x PP. `validate_parallel_sizes` checks every divisibility that
split needs against the model's numbers, before any process group or GPU memory exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelSizes:
    world_size: int
    tp: int = 1  # tensor parallel (attention, dense MLP, vocab)
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert parallel: experts are split over this many ranks
    etp: int = 1  # tensor parallel inside each expert

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part: the number of distinct batch shards."""
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Data-parallel size of the expert part: replicas of each expert."""
        return self.world_size // (self.etp * self.ep * self.pp)


def validate_parallel_sizes(
    sizes: ParallelSizes,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    num_experts: int | None = None,
    moe_ffn_hidden_size: int | None = None,
    ffn_hidden_size: int | None = None,
) -> ParallelSizes:
    """Raise ValueError naming the numbers if `sizes` cannot lay out this model; return `sizes` otherwise."""
    for name in ("world_size", "tp", "pp", "ep", "etp"):
        value = getattr(sizes, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"megatron parallel size {name}={value!r} must be a positive integer")
    world = sizes.world_size
    checks = [
        (world % (sizes.tp * sizes.pp), f"world size {world} is not divisible by tp*pp = {sizes.tp}*{sizes.pp}"),
        (
            world % (sizes.etp * sizes.ep * sizes.pp),
            f"world size {world} is not divisible by etp*ep*pp = {sizes.etp}*{sizes.ep}*{sizes.pp}",
        ),
        (num_attention_heads % sizes.tp, f"{num_attention_heads} attention heads are not divisible by tp={sizes.tp}"),
        (num_kv_heads % sizes.tp, f"{num_kv_heads} KV heads (query groups) are not divisible by tp={sizes.tp}"),
        (vocab_size % sizes.tp, f"vocab size {vocab_size} is not divisible by tp={sizes.tp}"),
        (num_layers % sizes.pp, f"{num_layers} layers are not divisible by pp={sizes.pp}"),
    ]
    if num_experts is None:
        if sizes.ep > 1 or sizes.etp > 1:
            raise ValueError(f"ep={sizes.ep} and etp={sizes.etp} need a MoE model, this one has no experts")
    else:
        checks.append((num_experts % sizes.ep, f"{num_experts} experts are not divisible by ep={sizes.ep}"))
        if moe_ffn_hidden_size is not None:
            checks.append(
                (
                    moe_ffn_hidden_size % sizes.etp,
                    f"expert FFN size {moe_ffn_hidden_size} is not divisible by etp={sizes.etp}",
                )
            )
    if ffn_hidden_size is not None:
        checks.append((ffn_hidden_size % sizes.tp, f"FFN size {ffn_hidden_size} is not divisible by tp={sizes.tp}"))
    for remainder, message in checks:
        if remainder:
            raise ValueError(f"invalid megatron parallel sizes: {message}")
    return sizes


def sizes_for_hf_config(hf_config, sizes: ParallelSizes) -> ParallelSizes:
    """`validate_parallel_sizes` with the numbers read from a HF Qwen3 / Qwen3-MoE config."""
    num_experts = getattr(hf_config, "num_experts", None)
    return validate_parallel_sizes(
        sizes,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        vocab_size=hf_config.vocab_size,
        num_experts=num_experts,
        moe_ffn_hidden_size=getattr(hf_config, "moe_intermediate_size", None) if num_experts else None,
        ffn_hidden_size=None if num_experts else hf_config.intermediate_size,
    )


def initialize_parallel_state(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Create megatron-core's TP/PP/EP/DP groups on the already initialised default process group."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize_parallel_state needs torch.distributed.init_process_group to have run")
    if torch.distributed.get_world_size() != sizes.world_size:
        raise ValueError(
            f"megatron sizes are for world size {sizes.world_size}, the process group has "
            f"{torch.distributed.get_world_size()} ranks"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        create_gloo_process_groups=True,
    )
    # The inference RNG tracker avoids CUDA generator state, so the same call works on CPU.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def check_openrlhf_chunking(sizes: ParallelSizes) -> None:
    """OpenRLHF gives actor r chunk r // tp: the TP group must be those tp ranks, and (one stage) the chunk index
    megatron's data-parallel rank. With pp > 1 a replica pools its stages' chunks, whichever they are."""
    import torch
    from megatron.core import parallel_state as ps

    rank = torch.distributed.get_rank()
    tp_ranks = torch.distributed.get_process_group_ranks(ps.get_tensor_model_parallel_group())
    chunk_ranks = list(range(rank // sizes.tp * sizes.tp, (rank // sizes.tp + 1) * sizes.tp))
    if sorted(tp_ranks) != chunk_ranks or (sizes.pp == 1 and ps.get_data_parallel_rank() != rank // sizes.tp):
        raise ValueError(
            f"rank {rank}: megatron TP group {tp_ranks}, data-parallel rank {ps.get_data_parallel_rank()}; OpenRLHF "
            f"sends ranks {chunk_ranks} chunk {rank // sizes.tp}, which would reach the wrong replica"
        )


def destroy_parallel_state() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
