"""The worker of test_megatron_gpu_optimizer.py (spawned processes import it by this top-level name)."""

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


def resume_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from openrlhf_gmpo.megatron import training_state
    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state
    from openrlhf_gmpo.megatron.train import PolicyMicroBatch

    hm.init_gloo(rank, world_size, port)
    helpers_cpu_shims.emulate_cuda_tensors()
    sizes = ParallelSizes(world_size, ep=2)
    initialize_parallel_state(sizes)
    hf = hm.tiny_hf_moe()
    batch = hm.policy_batch()
    keys = ("sequences", "attention_mask", "action_mask", "old_log_probs", "advantages")
    micro_batches = [PolicyMicroBatch(*(batch[k][i : i + 1] for k in keys)) for i in (2 * rank, 2 * rank + 1)]

    model, ddp, optimizer, schedule = _build(hf, sizes)
    names = [type(part).__name__ for part in optimizer.chained_optimizers]
    assert names == ["DistributedOptimizer", "DistributedOptimizer"], names  # dense and expert parameters
    # Norms included: megatron's local spec builds them in fp32 whatever params_dtype says (model._norms_to).
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    for _ in range(2):
        _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    saved, resaved = f"{out_dir}/saved", f"{out_dir}/resaved"
    for path in (saved, resaved):
        torch.distributed.barrier()
        if rank == 0:
            os.makedirs(path)
    torch.distributed.barrier()
    training_state.save(saved, model, optimizer, schedule, {"episode": 2})
    before_third = _weights(model)
    third = _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    uninterrupted = _weights(model)

    model, ddp, optimizer, schedule = _build(hf, sizes)
    assert training_state.load(saved, model, optimizer, schedule) == {"episode": 2}
    resumed_weights = _weights(model)
    for name, weight in before_third.items():
        assert torch.equal(resumed_weights[name], weight), name
    resumed = _step(ddp, optimizer, schedule, micro_batches, sizes.dp)
    assert resumed["grad_norm"] == third["grad_norm"]
    after = _weights(model)
    for name, weight in uninterrupted.items():
        assert torch.equal(after[name], weight), name
    assert any(not torch.equal(after[n], before_third[n]) for n in after)  # the third step moved the weights
    steps = [state["step"] for state in training_state.adam_states(optimizer)]
    assert {float(step) for step in steps} == {3.0}, sorted({float(step) for step in steps})
    assert len({id(step) for step in steps}) == len(steps)  # one counter per parameter

    # A second resume: the dense and expert optimizers' counters agree, which megatron asserts when it loads them.
    training_state.save(resaved, model, optimizer, schedule, {"episode": 3})
    model, ddp, optimizer, schedule = _build(hf, sizes)
    assert training_state.load(resaved, model, optimizer, schedule) == {"episode": 3}
    torch.distributed.barrier()
    with open(f"{out_dir}/rank{rank}.ok", "w") as f:
        f.write("ok")
    torch.distributed.destroy_process_group()
