"""Weight sync from the megatron policy to OpenRLHF's vLLM engines, on OpenRLHF 0.11.2's contract.

Every rank walks the streaming export (`iter_hf_weights`, per-expert names as vLLM loads them) in lockstep; for each
HF tensor, rank 0 tells every engine `update_weight(name, dtype, shape, empty_cache)` and broadcasts the bf16 tensor
over an NCCL group of rank 0 + all vLLM workers. With `--train.colocate_all` (engines on the trainer's GPUs) OpenRLHF
uses CUDA IPC instead: every rank shares a handle to its copy, rank 0 sends the handles by physical GPU id with
`update_weight_cuda_ipc`. Both paths follow `ActorPPOTrainer.broadcast_to_vllm`. Neither has run against vLLM; the
broadcast path's sending side is tested on CPU against engines that record their calls (test_megatron_vllm_sync.py).
"""

from __future__ import annotations

import torch

from openrlhf_gmpo.megatron.weights import iter_hf_weights, layer_hf_names


def use_cuda_ipc(args) -> bool:
    """OpenRLHF's rule: NCCL sync backend, engines colocated, synchronous training."""
    backend = getattr(args.vllm, "sync_backend", "nccl")
    return backend == "nccl" and args.train.colocate_all and not args.train.async_enable


def init_broadcast_group(args, vllm_engines, port: int):
    """On rank 0: an NCCL group of this process and every vLLM worker (world = engines x vLLM TP + 1)."""
    import ray
    from openrlhf.utils.distributed_util import stateless_init_process_group

    vllm = args.vllm
    address = ray._private.services.get_node_ip_address()
    world_size = vllm.num_engines * vllm.tensor_parallel_size + 1
    refs = [
        engine.init_process_group.remote(
            address, port, i * vllm.tensor_parallel_size + 1, world_size, "openrlhf", backend="nccl", use_ray=False
        )
        for i, engine in enumerate(vllm_engines)
    ]
    group = stateless_init_process_group(address, port, 0, world_size, torch.cuda.current_device())
    ray.get(refs)
    return group


def hf_weight_count(hf_config) -> int:
    """How many tensors a sync sends: embedding, the layers (per-expert names), final norm and, unless tied, lm_head.
    vLLM empties its cache after the last one."""
    head = 0 if hf_config.tie_word_embeddings else 1
    return 2 + head + hf_config.num_hidden_layers * len(layer_hf_names(hf_config, "per_expert"))


def sync_weights(model, hf_config, vllm_engines, *, broadcast_group=None, cuda_ipc: bool = False,
                 reset_prefix_cache: bool = False) -> None:  # fmt: skip
    """Send every HF-named weight to the engines; all ranks call it together."""
    import ray
    from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

    rank0 = torch.distributed.get_rank() == 0
    cache_resets = [e.reset_prefix_cache.remote() for e in vllm_engines] if rank0 and reset_prefix_cache else []
    total, sent = hf_weight_count(hf_config), 0
    for name, tensor in iter_hf_weights(model, hf_config, "per_expert"):
        if hf_config.tie_word_embeddings and name == "lm_head.weight":
            continue  # vLLM ties lm_head to the embedding itself
        sent += 1
        weight = tensor.to(torch.bfloat16).contiguous()  # vLLM asserts the dtype it was started with
        kwargs = dict(dtype=weight.dtype, shape=weight.shape, empty_cache=sent == total)
        if cuda_ipc:
            _send_cuda_ipc(name, weight, vllm_engines, rank0, kwargs)
            torch_dist_barrier_and_cuda_sync()  # engines have copied it before the weight is freed
        elif rank0:
            refs = [engine.update_weight.remote(name, **kwargs) for engine in vllm_engines]
            broadcast_group.broadcast(weight, src=0, stream=torch.cuda.current_stream())
            ray.get(refs)
    ray.get(cache_resets)
    torch_dist_barrier_and_cuda_sync()


def _send_cuda_ipc(name: str, weight: torch.Tensor, vllm_engines, rank0: bool, kwargs: dict) -> None:
    import ray
    from openrlhf.trainer.ray.utils import get_physical_gpu_id
    from torch.multiprocessing.reductions import reduce_tensor

    handles = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(handles, {get_physical_gpu_id(): reduce_tensor(weight)})
    if rank0:
        by_gpu = {gpu: handle for handle_map in handles for gpu, handle in handle_map.items()}
        ray.get([engine.update_weight_cuda_ipc.remote(name, ipc_handles=by_gpu, **kwargs) for engine in vllm_engines])
