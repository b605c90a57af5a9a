"""The workers of test_megatron_gpu_optimizer.py (spawned processes import them by this top-level name)."""

import os

import helpers_cpu_shims
import helpers_megatron as hm
import torch

LR, CLIP = 1e-3, 0.1


def _build(hf, sizes):
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.train import LRSchedule, OptimizerOptions, build_optimizer, wrap_ddp
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    model = build_gpt_model(hf.config, sizes, params_dtype=torch.bfloat16)
    load_hf_weights(model, hf.state_dict(), hf.config)
    with helpers_cpu_shims.cuda_reported_available():
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, OptimizerOptions(lr=LR, weight_decay=0.1, clip_grad=CLIP))
    schedule = LRSchedule(optimizer, "constant", LR, total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.0)
    return model, ddp, optimizer, schedule


def _step(ddp, optimizer, schedule, micro_batches, dp_size):
    from openrlhf_gmpo.megatron.train import policy_update

    metrics = policy_update(
        ddp, optimizer, micro_batches, loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4,
        dp_size=dp_size,
    )  # fmt: skip
    assert metrics["update_skipped"] == 0.0
    schedule.step()
    return metrics


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def resume_check(sizes, rows: list[int], out_dir: str, device: str = "cpu") -> dict:
    """Build megatron's optimizer (bf16 weights), take two GMPO steps on `rows` of policy_batch, save, take a third;
    resume a fresh model from the save, offload and reload it, and take the third again; then save and resume once
    more. Returns what the caller asserts: the resumed weights' and third step's differences from the uninterrupted
    run, the Adam step counters, and the dtypes and optimizer classes that were built."""
    from openrlhf_gmpo.megatron import training_state

    rank = torch.distributed.get_rank()
    hf = hm.tiny_hf_moe()
    batch = {key: value.to(device) for key, value in hm.policy_batch().items()}
    micro_batches = hm.one_row_micro_batches(batch, rows)

    model, ddp, optimizer, schedule = _build(hf, sizes)
    built = {
        "optimizers": [type(part).__name__ for part in optimizer.chained_optimizers],
        "dtypes": {p.dtype for p in model.parameters()},
        "weight_decays": sorted({(group["wd_mult"], group["weight_decay"]) for group in optimizer.param_groups}),
    }
    for _ in range(2):
        _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    saved, resaved = os.path.join(out_dir, "saved"), os.path.join(out_dir, "resaved")
    if rank == 0:
        os.makedirs(saved)
        os.makedirs(resaved)
    torch.distributed.barrier()
    training_state.save(saved, model, optimizer, schedule, {"episode": 2})
    before_third = _weights(model)
    third = _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    uninterrupted = _weights(model)

    model, ddp, optimizer, schedule = _build(hf, sizes)
    client_states = training_state.load(saved, model, optimizer, schedule)
    loaded = _weights(model)
    # The actor's sleep mode around the step, as under --ds.enable_sleep: gradient buffers freed, then restored.
    training_state.offload(ddp, optimizer)
    training_state.reload(ddp, optimizer)
    resumed = _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    after = _weights(model)
    steps = [state["step"] for state in training_state.adam_states(optimizer)]

    # A second resume: the dense and expert optimizers' counters must agree, which megatron asserts when it loads.
    training_state.save(resaved, model, optimizer, schedule, {"episode": 3})
    model, ddp, optimizer, schedule = _build(hf, sizes)
    second_client_states = training_state.load(resaved, model, optimizer, schedule)
    torch.distributed.barrier()
    return {
        **built,
        "client_states": (client_states, second_client_states),
        "loaded_difference": _max_difference(loaded, before_third),
        "third_step_difference": _max_difference(after, uninterrupted),
        "third_step_moved": _max_difference(after, before_third),
        "grad_norms": (third["grad_norm"], resumed["grad_norm"]),
        "step_counters": sorted({float(step) for step in steps}),
        "step_counters_distinct": len({id(step) for step in steps}) == len(steps),
        "step_counters_on_host": all(step.device.type == "cpu" for step in steps),
    }


def resume_worker(rank: int, world_size: int, port: int, out_dir: str, layout: dict) -> None:
    """2 gloo ranks on CPU with CUDA tensors emulated, so that megatron's GPU optimizer path runs. `layout`: the
    parallel sizes (ep=2: two replicas on 2 rows each; pp=2: one replica on all 4 rows, split in two stages)."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state

    hm.init_gloo(rank, world_size, port)
    helpers_cpu_shims.emulate_cuda_tensors()
    sizes = ParallelSizes(world_size, **layout)
    initialize_parallel_state(sizes)
    count = 4 // sizes.dp
    rows = list(
        range(count * parallel_state.get_data_parallel_rank(), count * (parallel_state.get_data_parallel_rank() + 1))
    )
    result = resume_check(sizes, rows, out_dir)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def bf16_grads_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One GMPO step with megatron's optimizer (bf16 weights, EP=2, CUDA tensors emulated) with the gradient buffers
    in fp32 and in bf16 (`--megatron.bf16_grads`, the 30B-A3B presets' setting): the grad norms, the buffers' dtypes
    and the weights after each."""
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state
    from openrlhf_gmpo.megatron.train import OptimizerOptions, build_optimizer, policy_update, wrap_ddp
    from openrlhf_gmpo.megatron.weights import iter_hf_weights, load_hf_weights

    hm.init_gloo(rank, world_size, port)
    helpers_cpu_shims.emulate_cuda_tensors()
    sizes = ParallelSizes(world_size, ep=2)
    hf = hm.tiny_hf_moe()
    micro_batches = hm.one_row_micro_batches(hm.policy_batch(), [2 * rank, 2 * rank + 1])
    result = {}
    for fp32_grads in (True, False):
        initialize_parallel_state(sizes)
        model = build_gpt_model(hf.config, sizes, params_dtype=torch.bfloat16)
        load_hf_weights(model, hf.state_dict(), hf.config)
        with helpers_cpu_shims.cuda_reported_available():
            ddp = wrap_ddp(model, fp32_grads=fp32_grads)
            optimizer = build_optimizer(ddp, OptimizerOptions(lr=LR, clip_grad=CLIP))
        metrics = policy_update(
            ddp, optimizer, micro_batches, loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=4,
            dp_size=sizes.dp,
        )  # fmt: skip
        result["fp32" if fp32_grads else "bf16"] = {
            "grad_norm": metrics["grad_norm"],
            "buffer_dtypes": {b.grad_data.dtype for b in ddp.buffers + ddp.expert_parallel_buffers},
            "weights": {name: t.float().clone() for name, t in iter_hf_weights(model, hf.config)},
        }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
