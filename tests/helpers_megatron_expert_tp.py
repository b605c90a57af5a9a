"""The megatron backend with each expert split over 2 ETP ranks and the experts over 2 EP ranks, on 4 gloo CPU
processes: megatron's dispatcher all-gathers and reduce-scatters per-rank token counts over the ETP group there,
which gloo does only with equal sizes (helpers_cpu_shims.uneven_gloo_collectives fills that in)."""

from __future__ import annotations

import helpers_cpu_shims
import helpers_megatron as hm
import torch


def expert_tp_suite_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from megatron.core import parallel_state as ps

    from openrlhf_gmpo.megatron.parallel import ParallelSizes

    hm.init_gloo(rank, world_size, port)
    helpers_cpu_shims.uneven_gloo_collectives()
    batch, hf, sizes = hm.policy_batch(), hm.tiny_hf_moe(), ParallelSizes(world_size, ep=2, etp=2)
    results = {"eval": hm._eval_layout(hf, sizes, batch)}
    ranks = torch.distributed.get_process_group_ranks
    results["groups"] = {
        "expert_tensor": ranks(ps.get_expert_tensor_parallel_group()),
        "expert_model": ranks(ps.get_expert_model_parallel_group()),
        "data_parallel": ranks(ps.get_data_parallel_group()),
    }
    results["update"] = hm._update(hf, sizes, batch, rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
