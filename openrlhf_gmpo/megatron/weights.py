"""HF Qwen3 / Qwen3-MoE <-> megatron-core GPTModel weights.

Import: `hf_to_megatron` yields this rank's megatron tensors (its pipeline stage, TP/ETP shard and local experts) from
a HF state dict or a lazy safetensors checkpoint, so a rank reads only what it holds. Export: `iter_hf_weights`
gathers one HF tensor at a time over TP, ETP, EP and PP and yields it on every rank, so a 30B model is never
materialised whole.

Layouts (megatron local-spec names; Transformer Engine renames a few, see `local_spec_name`):
- linear_qkv rows are grouped per KV head: [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]; TP
  ranks own whole groups, so a TP shard is a contiguous chunk of rows.
- linear_fc1 of a gated MLP is [gate; up]; under TP/ETP each rank holds [gate shard; up shard].
- HF keeps the experts of a layer fused (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) in memory
  and per expert (`mlp.experts.{e}.gate_proj.weight`, ...) in checkpoints and in vLLM; both are read and written.
- Expert e lives on EP rank e // (E / ep) as local expert e % (E / ep).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from openrlhf_gmpo.megatron.model import head_dim, is_moe_config


@dataclass(frozen=True)
class ShardRank:
    """Where this rank sits in every parallel dimension."""

    tp_rank: int = 0
    tp: int = 1
    pp_rank: int = 0
    pp: int = 1
    ep_rank: int = 0
    ep: int = 1
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def current(cls) -> ShardRank:
        from megatron.core import parallel_state as ps

        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep=ps.get_expert_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
        )


# ---- pure tensor transforms -------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections -> megatron's linear_qkv weight, rows grouped per KV head."""
    head_dim = k.shape[0] // num_groups
    hidden = q.shape[1]
    q = q.reshape(num_groups, num_heads // num_groups * head_dim, hidden)
    k = k.reshape(num_groups, head_dim, hidden)
    v = v.reshape(num_groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `fuse_qkv`: (q, k, v)."""
    hidden = qkv.shape[1]
    per_group = qkv.reshape(num_groups, (num_heads // num_groups + 2) * head_dim, hidden)
    q_rows = num_heads // num_groups * head_dim
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def shard(tensor: torch.Tensor, size: int, rank: int, dim: int) -> torch.Tensor:
    return tensor.chunk(size, dim=dim)[rank].contiguous()


def shard_gated_fc1(gate: torch.Tensor, up: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """[gate; up] for one TP rank: each half is split separately so the rank keeps matching gate and up rows."""
    return torch.cat([shard(gate, size, rank, 0), shard(up, size, rank, 0)], dim=0)


def unshard_gated_fc1(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `shard_gated_fc1` over all ranks' shards: full (gate, up)."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)


_TE_RENAMES = [
    # Transformer Engine fuses the norm before a linear into that linear, and keeps grouped experts in one module.
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
    (re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$"), r".mlp.experts.local_experts.\2.\1.weight"),
]


def local_spec_name(name: str) -> str:
    """A parameter name of either spec -> its local-spec name (identity for the local spec)."""
    for pattern, replacement in _TE_RENAMES:
        name = pattern.sub(replacement, name)
    return name


def local_spec_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {local_spec_name(n): p for n, p in model.named_parameters()}


# ---- HF -> megatron -----------------------------------------------------------------------------------------------


def _expert_weights(hf: Mapping, prefix: str, expert: int, moe_ffn: int):
    """(gate [I, H], up [I, H], down [H, I]) of one expert, from the fused in-memory or the per-expert layout."""
    fused = prefix + "mlp.experts.gate_up_proj"
    if fused in hf:
        gate_up = hf[fused][expert]
        return gate_up[:moe_ffn], gate_up[moe_ffn:], hf[prefix + "mlp.experts.down_proj"][expert]
    per_expert = f"{prefix}mlp.experts.{expert}."
    return tuple(hf[per_expert + f"{p}_proj.weight"] for p in ("gate", "up", "down"))


def hf_to_megatron(hf: Mapping[str, torch.Tensor], hf_config, rank: ShardRank) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's megatron tensors (local-spec names, local layer and expert indices) from HF weights."""
    c = hf_config
    layers_per_stage = c.num_hidden_layers // rank.pp
    first_layer = rank.pp_rank * layers_per_stage
    if rank.pp_rank == 0:
        yield "embedding.word_embeddings.weight", shard(hf["model.embed_tokens.weight"], rank.tp, rank.tp_rank, 0)
    for local in range(layers_per_stage):
        h = f"model.layers.{first_layer + local}."
        m = f"decoder.layers.{local}."
        attn = h + "self_attn."
        qkv = fuse_qkv(
            hf[attn + "q_proj.weight"],
            hf[attn + "k_proj.weight"],
            hf[attn + "v_proj.weight"],
            c.num_attention_heads,
            c.num_key_value_heads,
        )
        yield m + "input_layernorm.weight", hf[h + "input_layernorm.weight"]
        yield m + "self_attention.linear_qkv.weight", shard(qkv, rank.tp, rank.tp_rank, 0)
        yield m + "self_attention.linear_proj.weight", shard(hf[attn + "o_proj.weight"], rank.tp, rank.tp_rank, 1)
        yield m + "self_attention.q_layernorm.weight", hf[attn + "q_norm.weight"]
        yield m + "self_attention.k_layernorm.weight", hf[attn + "k_norm.weight"]
        yield m + "pre_mlp_layernorm.weight", hf[h + "post_attention_layernorm.weight"]
        if is_moe_config(c):
            yield m + "mlp.router.weight", hf[h + "mlp.gate.weight"]
            local_experts = c.num_experts // rank.ep
            for j in range(local_experts):
                gate, up, down = _expert_weights(hf, h, rank.ep_rank * local_experts + j, c.moe_intermediate_size)
                e = f"{m}mlp.experts.local_experts.{j}."
                yield e + "linear_fc1.weight", shard_gated_fc1(gate, up, rank.etp, rank.etp_rank)
                yield e + "linear_fc2.weight", shard(down, rank.etp, rank.etp_rank, 1)
        else:
            gate, up = hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]
            yield m + "mlp.linear_fc1.weight", shard_gated_fc1(gate, up, rank.tp, rank.tp_rank)
            yield m + "mlp.linear_fc2.weight", shard(hf[h + "mlp.down_proj.weight"], rank.tp, rank.tp_rank, 1)
    if rank.pp_rank == rank.pp - 1:
        yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        yield "output_layer.weight", shard(hf[head], rank.tp, rank.tp_rank, 0)


def load_hf_weights(model: torch.nn.Module, hf: Mapping[str, torch.Tensor], hf_config) -> None:
    """Copy HF weights into this rank's megatron model; every parameter must be written exactly once."""
    params = local_spec_params(model)
    written = set()
    for name, tensor in hf_to_megatron(hf, hf_config, ShardRank.current()):
        if name not in params:
            # With tied embeddings and one pipeline stage the output layer is the embedding itself.
            if name == "output_layer.weight" and hf_config.tie_word_embeddings:
                continue
            raise KeyError(f"HF->megatron mapping produced {name!r}, which this megatron model does not have")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: megatron shape {tuple(param.shape)} != mapped HF shape {tuple(tensor.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        written.add(name)
    missing = sorted(set(params) - written)
    if missing:
        raise KeyError(f"megatron parameters not written by the HF mapping: {missing}")


# ---- megatron -> HF (streaming) -------------------------------------------------------------------------------------


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    size = torch.distributed.get_world_size(group=group)
    if size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(out, tensor.contiguous(), group=group)
    return out


def _from_stage(tensor: torch.Tensor | None, owner_stage: int, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """Give every pipeline stage the tensor that `owner_stage` computed. Its shape comes from the HF config
    (`hf_shape`) and its dtype from the local weights, so nothing but the tensor travels."""
    from megatron.core import parallel_state as ps

    if tensor is not None and (tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype):
        raise RuntimeError(f"stage {owner_stage} sends {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
    group = ps.get_pipeline_model_parallel_group()
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.broadcast(tensor, src=torch.distributed.get_process_group_ranks(group)[owner_stage], group=group)
    return tensor


def hf_shape(c, name: str) -> tuple[int, ...]:
    """The shape of HF tensor `name` (`model.embed_tokens.weight`, `model.layers.{i}.{layer name}`, ...) of config
    `c`, as `iter_hf_weights` yields it."""
    from openrlhf_gmpo.megatron.model import head_dim

    hidden, d = c.hidden_size, head_dim(c)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c.vocab_size, hidden)
    if name == "model.norm.weight" or name.endswith("layernorm.weight"):
        return (hidden,)
    suffix = name.split(".", 3)[-1]  # after "model.layers.{i}."
    moe_ffn = getattr(c, "moe_intermediate_size", None)
    shapes = {
        "self_attn.q_proj.weight": (c.num_attention_heads * d, hidden),
        "self_attn.k_proj.weight": (c.num_key_value_heads * d, hidden),
        "self_attn.v_proj.weight": (c.num_key_value_heads * d, hidden),
        "self_attn.o_proj.weight": (hidden, c.num_attention_heads * d),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (c.intermediate_size, hidden),
        "mlp.up_proj.weight": (c.intermediate_size, hidden),
        "mlp.down_proj.weight": (hidden, c.intermediate_size),
        "mlp.gate.weight": (getattr(c, "num_experts", 0), hidden),
        "mlp.experts.gate_up_proj": (getattr(c, "num_experts", 0), 2 * (moe_ffn or 0), hidden),
        "mlp.experts.down_proj": (getattr(c, "num_experts", 0), hidden, moe_ffn or 0),
    }
    if suffix in shapes:
        return shapes[suffix]
    if suffix.endswith(("gate_proj.weight", "up_proj.weight")):  # one expert, per-expert layout
        return (moe_ffn, hidden)
    if suffix.endswith("down_proj.weight"):
        return (hidden, moe_ffn)
    raise KeyError(f"no HF shape for {name!r}")


def _layer_to_hf(params: dict, local: int, hf_config, expert_layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of one layer held by this stage, gathered over TP, ETP and EP."""
    from megatron.core import parallel_state as ps

    c = hf_config
    tp_group = ps.get_tensor_model_parallel_group()
    m = f"decoder.layers.{local}."
    qkv = torch.cat(_all_gather(params[m + "self_attention.linear_qkv.weight"], tp_group), dim=0)
    q, k, v = split_qkv(qkv, c.num_attention_heads, c.num_key_value_heads, head_dim(c))
    yield "self_attn.q_proj.weight", q
    yield "self_attn.k_proj.weight", k
    yield "self_attn.v_proj.weight", v
    o_proj = torch.cat(_all_gather(params[m + "self_attention.linear_proj.weight"], tp_group), dim=1)
    yield "self_attn.o_proj.weight", o_proj
    yield "self_attn.q_norm.weight", params[m + "self_attention.q_layernorm.weight"]
    yield "self_attn.k_norm.weight", params[m + "self_attention.k_layernorm.weight"]
    yield "input_layernorm.weight", params[m + "input_layernorm.weight"]
    yield "post_attention_layernorm.weight", params[m + "pre_mlp_layernorm.weight"]
    if not is_moe_config(c):
        gate, up = unshard_gated_fc1(_all_gather(params[m + "mlp.linear_fc1.weight"], tp_group))
        yield "mlp.gate_proj.weight", gate
        yield "mlp.up_proj.weight", up
        yield "mlp.down_proj.weight", torch.cat(_all_gather(params[m + "mlp.linear_fc2.weight"], tp_group), 1)
        return
    yield "mlp.gate.weight", params[m + "mlp.router.weight"]
    etp_group, ep_group = ps.get_expert_tensor_parallel_group(), ps.get_expert_model_parallel_group()
    local_experts = c.num_experts // ps.get_expert_model_parallel_world_size()
    gate_up, down = [None] * c.num_experts, [None] * c.num_experts
    for j in range(local_experts):
        e = f"{m}mlp.experts.local_experts.{j}."
        gate, up = unshard_gated_fc1(_all_gather(params[e + "linear_fc1.weight"], etp_group))
        fc1 = torch.cat([gate, up], dim=0)
        fc2 = torch.cat(_all_gather(params[e + "linear_fc2.weight"], etp_group), dim=1)
        gathered = zip(_all_gather(fc1, ep_group), _all_gather(fc2, ep_group), strict=True)
        for ep_rank, (fc1_r, fc2_r) in enumerate(gathered):
            expert = ep_rank * local_experts + j
            if expert_layout == "per_expert":
                # Per expert: yield at once, so only one expert's gathered copies are alive at a time.
                name = f"mlp.experts.{expert}."
                yield name + "gate_proj.weight", fc1_r[: c.moe_intermediate_size]
                yield name + "up_proj.weight", fc1_r[c.moe_intermediate_size :]
                yield name + "down_proj.weight", fc2_r
            else:
                gate_up[expert], down[expert] = fc1_r, fc2_r
    if expert_layout == "fused":
        yield "mlp.experts.gate_up_proj", torch.stack(gate_up)
        yield "mlp.experts.down_proj", torch.stack(down)


def iter_hf_weights(
    model: torch.nn.Module, hf_config, expert_layout: str = "fused"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full_tensor)` one at a time, on every rank; all ranks must iterate it to the end together.

    expert_layout: "fused" gives transformers' in-memory names (`mlp.experts.gate_up_proj`), "per_expert" the
    checkpoint / vLLM names (`mlp.experts.{e}.gate_proj.weight`).
    """
    from megatron.core import parallel_state as ps

    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"expert_layout={expert_layout!r}: choose 'fused' or 'per_expert'")
    c = hf_config
    params = {n: p.detach() for n, p in local_spec_params(model).items()}
    tp_group = ps.get_tensor_model_parallel_group()
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    layers_per_stage = c.num_hidden_layers // pp

    dtype = next(iter(params.values())).dtype  # every weight (or gradient) of the model has the model's dtype

    def from_stage(tensor, owner, name):
        return tensor if pp == 1 else _from_stage(tensor, owner, hf_shape(c, name), dtype)

    embed = None
    if pp_rank == 0:
        embed = torch.cat(_all_gather(params["embedding.word_embeddings.weight"], tp_group), dim=0)
    embed = from_stage(embed, 0, "model.embed_tokens.weight")
    yield "model.embed_tokens.weight", embed
    for layer in range(c.num_hidden_layers):
        owner = layer // layers_per_stage
        mine = pp_rank == owner
        # Every stage walks the owner's names in the same order, so the broadcasts pair up.
        names_and_tensors = _layer_to_hf(params, layer - owner * layers_per_stage, c, expert_layout) if mine else None
        for name in layer_hf_names(c, expert_layout):
            tensor = None
            if mine:
                produced_name, tensor = next(names_and_tensors)
                assert produced_name == name, (produced_name, name)
            full_name = f"model.layers.{layer}.{name}"
            yield full_name, from_stage(tensor, owner, full_name)
    norm = params["decoder.final_layernorm.weight"] if pp_rank == pp - 1 else None
    yield "model.norm.weight", from_stage(norm, pp - 1, "model.norm.weight")
    if c.tie_word_embeddings:
        yield "lm_head.weight", embed
        return
    head = None
    if pp_rank == pp - 1:
        head = torch.cat(_all_gather(params["output_layer.weight"], tp_group), dim=0)
    yield "lm_head.weight", from_stage(head, pp - 1, "lm_head.weight")


def layer_hf_names(c, expert_layout: str) -> list[str]:
    """A decoder layer's HF names, in the order `_layer_to_hf` yields them (every pipeline stage needs it, not only
    the owner; the vLLM sync counts what it sends from it)."""
    names = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
    names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight"]
    names += ["post_attention_layernorm.weight"]
    if not is_moe_config(c):
        return names + ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names.append("mlp.gate.weight")
    if expert_layout == "fused":
        return names + ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    from megatron.core import parallel_state as ps

    # Per-expert order follows (local index, EP rank), as _layer_to_hf gathers them.
    ep = ps.get_expert_model_parallel_world_size()
    local = c.num_experts // ep
    for j in range(local):
        for ep_rank in range(ep):
            names += [f"mlp.experts.{ep_rank * local + j}.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names
