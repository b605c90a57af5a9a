"""The megatron backend with 2 pipeline stages, on 4 gloo CPU processes: one spawn, every layout, results per rank.

Layouts (world 4): pp2 alone (2 data-parallel replicas), pp2 x ep2 (megatron orders pipeline ranks last, so the
stages of a replica are ranks r and r + 2), pp2 x ep2 with the CountDown models' top-1 routing and tied embedding
(the last stage holds a copy of the embedding as its output layer, kept equal by an all-reduce of its gradient), and
a dense Qwen3 at pp2 x tp2.
"""

from __future__ import annotations

import helpers_cpu_shims
import helpers_megatron as hm
import torch

LAYOUTS = {
    "pp2": (hm.tiny_hf_moe, dict(pp=2)),
    "pp2_ep2": (hm.tiny_hf_moe, dict(pp=2, ep=2)),
    "pp2_ep2_top1_tied": (hm.tiny_hf_moe_top1_tied, dict(pp=2, ep=2)),
    # A dense Qwen3 with TP inside each stage (no sequence parallelism without Transformer Engine).
    "dense_pp2_tp2": (hm.tiny_hf_dense, dict(pp=2, tp=2)),
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


def _ragged_update(hf, sizes, batch):
    """One GMPO update at pp2 (DP 2) with micro-batches of different shapes: replica 0 takes rows 0-1 as one
    (2 x 12) micro-batch, replica 1 row 2 (1 x 12) and then row 3 without its 4 padding columns (1 x 8)."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.train import (
        OptimizerOptions,
        PolicyMicroBatch,
        build_optimizer,
        policy_update,
        wrap_ddp,
    )
    from openrlhf_gmpo.megatron.weights import iter_hf_weights, load_hf_weights

    initialize_parallel_state(sizes)
    model = build_gpt_model(hf.config, sizes)
    load_hf_weights(model, hf.state_dict(), hf.config)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerOptions(lr=hm.UPDATE["lr"], clip_grad=hm.UPDATE["clip_grad"]))
    keys = ("sequences", "attention_mask", "action_mask", "old_log_probs", "advantages")
    rows_and_start = [([0, 1], 0)] if parallel_state.get_data_parallel_rank() == 0 else [([2], 0), ([3], 4)]
    micro_batches = []
    for rows, start in rows_and_start:
        parts = {key: batch[key][rows] for key in keys}
        parts["sequences"], parts["attention_mask"] = parts["sequences"][:, start:], parts["attention_mask"][:, start:]
        micro_batches.append(PolicyMicroBatch(**parts))
    metrics = policy_update(
        ddp, optimizer, micro_batches, loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4,
        dp_size=sizes.dp,
    )  # fmt: skip
    shapes = [tuple(mb.sequences.shape) for mb in micro_batches]
    return metrics["grad_norm"], shapes, {n: t.clone() for n, t in iter_hf_weights(model, hf.config)}


def _replay_update(hf, sizes, batch, replay: bool, recompute: bool = False):
    """A GMPO update with routing replay after every router was negated: the recorded experts (chosen by the HF
    routers, through this layout's own forward) are used, not the ones the negated routers would choose. Returns
    the grad norm, and the HF-named weights and clipped gradients after the step. `recompute`: each layer is re-run
    in the backward (--megatron.recompute), and its router must replay the same experts there too."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron import pipeline, routing_replay
    from openrlhf_gmpo.megatron.logprobs import token_log_probs
    from openrlhf_gmpo.megatron.model import MoEOptions, build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.train import OptimizerOptions, build_optimizer, policy_update, wrap_ddp
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    initialize_parallel_state(sizes)
    model = build_gpt_model(hf.config, sizes, moe=MoEOptions(routing_replay=True), recompute=recompute)
    load_hf_weights(model, hf.state_dict(), hf.config)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerOptions(lr=hm.UPDATE["lr"], clip_grad=hm.UPDATE["clip_grad"]))
    count = len(batch["sequences"]) // sizes.dp
    rows = list(
        range(count * parallel_state.get_data_parallel_rank(), count * (parallel_state.get_data_parallel_rank() + 1))
    )
    ids, mask = batch["sequences"][rows], batch["attention_mask"][rows]
    with torch.no_grad():
        if pipeline.is_pipelined():
            per_batch = []
            pipeline.pipeline_log_probs(model, [(ids, mask)], routing_into=per_batch)
            recorded = per_batch[0]
        else:
            recorded = []
            with routing_replay.recording(mask, into=recorded):
                token_log_probs(model, ids, mask)
        for name, param in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                param.neg_()  # exact: every top-k choice flips to the other end
    micro_batches = hm.one_row_micro_batches(batch, rows)
    if replay:
        for micro_batch, routing in zip(micro_batches, recorded, strict=True):
            micro_batch.routing = [routing]
    metrics = policy_update(
        ddp, optimizer, micro_batches, loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4,
        dp_size=sizes.dp,
    )  # fmt: skip
    return metrics["grad_norm"], *hm.hf_weights_and_gradients(model, hf.config)


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
    results["ragged_update"] = _ragged_update(hm.tiny_hf_moe(), ParallelSizes(world_size, pp=2), batch)
    moe, ep2, pp2_ep2 = hm.tiny_hf_moe(), ParallelSizes(world_size, ep=2), ParallelSizes(world_size, pp=2, ep=2)
    results["replay"] = {
        "ep2": _replay_update(moe, ep2, batch, replay=True),
        "pp2_ep2": _replay_update(moe, pp2_ep2, batch, replay=True),
        "pp2_ep2_free": _replay_update(moe, pp2_ep2, batch, replay=False),
        # Activation recomputation re-runs each layer's router in the backward, from the queued replay targets.
        "ep2_recompute": _replay_update(moe, ep2, batch, replay=True, recompute=True),
        "pp2_ep2_recompute": _replay_update(moe, pp2_ep2, batch, replay=True, recompute=True),
        "pp2_ep2_recompute_free": _replay_update(moe, pp2_ep2, batch, replay=False, recompute=True),
    }
    # Last: megatron's GPU optimizer path (distributed optimizer over DDP's buffers, its own grad-norm clip), with
    # CUDA tensors emulated for the rest of this process.
    helpers_cpu_shims.emulate_cuda_tensors()
    make_hf, layout = LAYOUTS["pp2_ep2_top1_tied"]
    hf, sizes = make_hf(), ParallelSizes(world_size, **layout)
    results["gpu_optimizer"] = {"update": hm._update(hf, sizes, batch, rank, gpu_optimizer=True)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
