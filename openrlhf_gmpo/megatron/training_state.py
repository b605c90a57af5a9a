"""The megatron actor's training state: each rank's resumable checkpoint (model shard, optimizer, learning-rate
schedule), and its offload to host memory while colocated vLLM engines generate.

Resumable with the same parallel sizes. megatron's distributed optimizer (GPU) keeps its fp32 master weights and Adam
moments sharded over data-parallel ranks and writes them through its own `save_parameter_state`, one file per rank
(`checkpoints.parameter_state_file`); the CPU stand-in optimizer keeps everything in its `state_dict`.
"""

from __future__ import annotations

import torch

from openrlhf_gmpo.megatron.checkpoints import parameter_state_file, rank_state_file


def save(path: str, model, optimizer, lr_schedule, client_states: dict | None) -> None:
    """Write this rank's state into the tag folder `path` (which must exist)."""
    rank = torch.distributed.get_rank()
    if hasattr(optimizer, "save_parameter_state"):
        optimizer.save_parameter_state(parameter_state_file(path, rank))
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "client_states": client_states or {},
    }
    torch.save(state, rank_state_file(path, rank))


def load(path: str, model, optimizer, lr_schedule) -> dict:
    """Restore what `save` wrote for this rank; returns the client states."""
    rank = torch.distributed.get_rank()
    state = torch.load(rank_state_file(path, rank), weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if hasattr(optimizer, "load_parameter_state"):
        _load_parameter_state(optimizer, parameter_state_file(path, rank))
    return state["client_states"]


def _load_parameter_state(optimizer, filename: str) -> None:
    """megatron-core 0.19.2's `load_parameter_state` over torch's AdamW (no Transformer Engine or Apex) fails a resume
    on the GPU twice over:
    - it copies every Adam state tensor from the file, `step` included, which the file does not hold (KeyError);
    - `load_state_dict` gave every parameter the same `step` tensor, which AdamW then advances once per parameter
      per step: a wrong bias correction, and the dense and expert optimizers' steps disagree at the next resume.
    (A third failure needs fp32 parameters, whose master copies are views that it writes in place outside
    `no_grad`; `model.build_gpt_model` leaves none.)
    """
    steps = [(state, state.pop("step")) for state in adam_states(optimizer) if "step" in state]
    optimizer.load_parameter_state(filename)
    for state, step in steps:
        state["step"] = step.clone()  # one counter per parameter (megatron made it on the host, where AdamW keeps it)


def adam_states(optimizer) -> list[dict]:
    """The per-parameter state dicts of the torch optimizers inside megatron's (chained) optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(part, "optimizer", None) for part in parts]
    return [state for opt in inner if opt is not None for state in opt.state.values()]


def offload(ddp_model, optimizer) -> None:
    """Free GPU memory for colocated vLLM engines (the actor's `offload_states`, --ds.enable_sleep): the optimizer
    states (fp32 master weights and Adam moments) go to host memory and the gradient buffers are freed. The bf16
    weights stay, as with OpenRLHF's DeepSpeed offload: the trainer reloads only around `fit`, and calls `forward`
    (old-policy log-probs) and `broadcast_to_vllm` while offloaded."""
    optimizer.offload_to_cpu()
    for buffer in ddp_model.buffers + ddp_model.expert_parallel_buffers:
        buffer.offload_to_cpu(move_params=False, move_grads=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reload(ddp_model, optimizer) -> None:
    """Undo `offload`. Adam's step counters stay on the host, where torch's AdamW keeps them: megatron's
    `restore_from_cpu` moves every state tensor to the GPU, and AdamW would then read each counter with a host sync,
    once per parameter per step."""
    for buffer in ddp_model.buffers + ddp_model.expert_parallel_buffers:
        buffer.reload_from_cpu(move_params=False, move_grads=True)
    optimizer.restore_from_cpu()
    for state in adam_states(optimizer):
        step = state.get("step")
        if torch.is_tensor(step) and step.device.type != "cpu":
            state["step"] = step.cpu()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
