"""Test-only helpers for running megatron-core on CPU with gloo process groups.

megatron-core assumes CUDA in a few places that do not matter for the maths (device lookups, side streams, a
device-to-host copy of the all-to-all split sizes). `install_cpu_shims()` replaces exactly those, as listed in
/work/shared/FACTS.md; package code never calls it. Everything else (layers, router, dispatcher, DDP) is the real
megatron-core code.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

TINY_MOE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)


class _NoOpEvent:
    def synchronize(self):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass


class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so ordering between streams is already given."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NoOpEvent()

    def synchronize(self):
        pass


_SHARED_STREAM = _NoOpStream()


def install_cpu_shims() -> None:
    """Patch the CUDA-only calls megatron-core makes on its CPU path (idempotent, per process)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *a, **k: _SHARED_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        # The all-to-all needs the split sizes as host numbers; on CPU the tensor is already on the host.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group; call first thing in a spawned worker."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    install_cpu_shims()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def tiny_hf_moe(seed: int = 0, **overrides):
    """A tiny random Qwen3-MoE HF model in fp32, the same on every process for a given seed."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{**TINY_MOE, **overrides})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float().eval()
    # HF's default init leaves the norms at 1 and the router near uniform; perturb them so a wrong mapping shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model


def tiny_hf_dense(seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings")
    config = Qwen3Config(**{**{k: TINY_MOE[k] for k in keys}, **overrides})
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def hf_token_log_probs(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token under the HF model, [B, L-1]."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
