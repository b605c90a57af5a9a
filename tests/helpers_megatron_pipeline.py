"""The megatron backend with 2 pipeline stages, on 4 gloo CPU processes: one spawn, every layout, results per rank.

Layouts (world 4): pp2 alone (2 data-parallel replicas), pp2 x ep2 (megatron then orders pipeline ranks last, so the
stages of a replica are ranks r and r + 2), and pp2 x ep2 with the CountDown models' top-1 routing and tied embedding
(the last stage holds a copy of the embedding as its output layer, kept equal by an all-reduce of its gradient).
"""

from __future__ import annotations

import helpers_cpu_shims
import helpers_megatron as hm
import torch

LAYOUTS = {
    "pp2": (hm.tiny_hf_moe, dict(pp=2)),
    "pp2_ep2": (hm.tiny_hf_moe, dict(pp=2, ep=2)),
    "pp2_ep2_top1_tied": (hm.tiny_hf_moe_top1_tied, dict(pp=2, ep=2)),
}


def _replica_groups() -> dict:
    """Which global ranks share this rank's pipeline and data-parallel groups (megatron's rank order)."""
    from megatron.core import parallel_state as ps

    ranks = torch.distributed.get_process_group_ranks
    return {
        "pipeline": ranks(ps.get_pipeline_model_parallel_group()),
        "data_parallel": ranks(ps.get_data_parallel_group()),
        "stage": ps.get_pipeline_model_parallel_rank(),
    }


def _ragged_micro_batches(hf, sizes, batch) -> float:
    """Log-probs through the stages for micro-batches of different sizes and lengths: rows 0-2, then row 3 with its
    4 padding columns cut off (the stages send each other the shapes first)."""
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.pipeline import pipeline_log_probs
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    initialize_parallel_state(sizes)
    model = build_gpt_model(hf.config, sizes)
    load_hf_weights(model, hf.state_dict(), hf.config)
    model.eval()
    ids, mask = batch["sequences"], batch["attention_mask"]
    parts = [(ids[:3], mask[:3]), (ids[3:, 4:], mask[3:, 4:])]
    first, last = pipeline_log_probs(model, parts)
    error = 0.0
    for (part_ids, part_mask), log_probs in zip(parts, (first, last), strict=True):
        reference = hm.hf_token_log_probs(hf, part_ids, part_mask)
        valid = hm.valid_prediction_mask(part_mask)
        error = max(error, (log_probs - reference)[valid].abs().max().item())
    return {"shapes": [tuple(first.shape), tuple(last.shape)], "log_prob_error": error}


def pipeline_suite_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state

    hm.init_gloo(rank, world_size, port)
    batch = hm.policy_batch()
    results = {}
    for label, (make_hf, layout) in LAYOUTS.items():
        hf, sizes = make_hf(), ParallelSizes(world_size, **layout)
        initialize_parallel_state(sizes)
        results[label] = {
            "groups": _replica_groups(),
            "eval": hm._eval_layout(hf, sizes, batch),
            "ragged": _ragged_micro_batches(hf, sizes, batch),
            "update": hm._update(hf, sizes, batch, rank),
        }
    # Last: megatron's GPU optimizer path (distributed optimizer over DDP's buffers, its own grad-norm clip), with
    # CUDA tensors emulated for the rest of this process.
    helpers_cpu_shims.emulate_cuda_tensors()
    make_hf, layout = LAYOUTS["pp2_ep2_top1_tied"]
    hf, sizes = make_hf(), ParallelSizes(world_size, **layout)
    results["gpu_optimizer"] = {"update": hm._update(hf, sizes, batch, rank, gpu_optimizer=True)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
