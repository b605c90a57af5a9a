"""One policy update on a megatron model: micro-batches, gradient accumulation, DP/EP gradient sync, clip, step.

The loss is any name of our registry (`compute_policy_loss`), given the global batch size and the DP size, so the
gradient is that of the whole batch whichever way it is split over DP ranks and micro-batches. Gradients are reduced
by megatron-core's DistributedDataParallel (dense params over DP, experts over expert-DP, both scaled 1/DP).
The optimizer is megatron's (fp32 master weights, distributed Adam) on GPU and torch AdamW on CPU, where
`get_megatron_optimizer` cannot run; `build_optimizer` hides the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from openrlhf_gmpo.losses import compute_policy_loss
from openrlhf_gmpo.megatron import routing_replay
from openrlhf_gmpo.megatron.logprobs import token_log_probs


@dataclass
class PolicyMicroBatch:
    """One micro-batch in OpenRLHF's layout: responses are the last A positions of the (left-padded) sequences."""

    sequences: torch.Tensor  # (b, S) token ids
    attention_mask: torch.Tensor  # (b, S) bool, False at padding
    action_mask: torch.Tensor  # (b, A) bool, True at response tokens
    old_log_probs: torch.Tensor  # (b, A) from the old-policy pass
    advantages: torch.Tensor  # (b,) or (b, A)
    rollout_log_probs: torch.Tensor | None = None  # (b, A) from vLLM, for the rollout importance correction
    routing: list[torch.Tensor] | None = None  # per sequence, experts recorded in the old-policy pass (replay)


def action_log_probs(model, sequences, attention_mask, num_actions: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the last `num_actions` tokens, (b, A), as OpenRLHF's actor returns them."""
    return token_log_probs(model, sequences, attention_mask, temperature=temperature)[:, -num_actions:]


def wrap_ddp(model: torch.nn.Module, fp32_grads: bool = True):
    """megatron-core DDP; the distributed optimizer's sharded buffers on GPU. `fp32_grads=False` accumulates and
    reduces gradients in the parameter dtype (bf16), which halves the gradient buffer (docs/megatron.md)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32_grads, overlap_grad_reduce=False, use_distributed_optimizer=torch.cuda.is_available()
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


@dataclass(frozen=True)
class OptimizerOptions:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)  # OpenRLHF's --actor.adam_betas default
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; OpenRLHF's --max_norm default


def build_optimizer(ddp_model, options: OptimizerOptions = OptimizerOptions()):
    """An optimizer whose `step()` returns (update_successful, grad_norm, num_zeros) and clips by global norm."""
    if options.lr <= 0 or options.clip_grad <= 0:
        raise ValueError(f"lr={options.lr} and clip_grad={options.clip_grad} must be > 0")
    if not torch.cuda.is_available():
        return TorchAdamW(ddp_model, options)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp_model.config
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=options.lr,
        weight_decay=options.weight_decay,
        adam_beta1=options.betas[0],
        adam_beta2=options.betas[1],
        adam_eps=options.eps,
        clip_grad=options.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=True,  # fp32 master weights and Adam states sharded over DP
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    # megatron puts biases and 1-D weights (norms) in groups with wd_mult 0, but only its own LR scheduler applies
    # wd_mult; LRSchedule sets the rate alone, so apply it here, once.
    for group in optimizer.param_groups:
        group["weight_decay"] = options.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def decays(name: str, param: torch.Tensor) -> bool:
    """megatron's default rule (and OpenRLHF's, in effect): no weight decay for biases and 1-D weights (norms)."""
    return param.dim() > 1 and not name.endswith(".bias")


class TorchAdamW:
    """CPU stand-in for megatron's optimizer: AdamW on DDP's reduced `main_grad`s, model-parallel grad-norm clip."""

    def __init__(self, ddp_model, options: OptimizerOptions):
        named = [(n, p) for n, p in ddp_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.options = options
        groups = [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": options.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ]
        self.inner = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=options.lr, betas=options.betas, eps=options.eps
        )

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def offload_to_cpu(self) -> None:
        """megatron's RL offload moves the optimizer states to host memory; this optimizer's live there already."""

    def restore_from_cpu(self) -> None:
        """The states stay in host memory (see offload_to_cpu)."""

    def step(self) -> tuple[bool, float, None]:
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        norm = model_parallel_grad_norm(self.params)
        if norm > self.options.clip_grad:
            for p in self.params:
                p.grad.mul_(self.options.clip_grad / (norm + 1e-6))
        self.inner.step()
        return True, norm, None


class LRSchedule:
    """OpenRLHF's learning-rate schedule (transformers' `get_scheduler`, with the arguments OpenRLHF's DeepSpeed
    strategy passes) for either optimizer: a one-parameter SGD carries the LambdaLR, and its rate is written into
    the real optimizer's param groups (times megatron's per-group `lr_mult`) before every step."""

    def __init__(
        self, optimizer, name: str, base_lr: float, *, total_steps: int, warmup_ratio: float, min_lr_ratio: float
    ):
        from transformers.trainer import get_scheduler

        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        kwargs = {"min_lr_rate": min_lr_ratio} if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") else {}
        carrier = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        self._schedule = get_scheduler(
            name,
            carrier,
            num_warmup_steps=math.ceil(total_steps * warmup_ratio),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=kwargs,
        )
        self._optimizer = optimizer
        self._apply()

    @property
    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self._schedule.get_last_lr()[0]

    def step(self) -> None:
        """Advance by one optimizer step."""
        self._schedule.optimizer.step()  # a no-op (no gradient); keeps torch's step-order check quiet
        self._schedule.step()
        self._apply()

    def state_dict(self) -> dict:
        return self._schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._schedule.load_state_dict(state)
        self._apply()

    def _apply(self) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_mult", 1.0)


def model_parallel_grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """L2 norm of the whole model's gradient: TP duplicates counted once, experts summed over EP/ETP/PP ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        # The last stage's copy of a tied embedding (`shared`) has the first stage's gradient: count it once.
        if p.grad is None or getattr(p, "shared", False) or not param_is_not_tensor_parallel_duplicate(p):
            continue
        square = p.grad.double().pow(2).sum().cpu()
        if getattr(p, "allreduce", True):
            dense_sq += square
        else:  # megatron marks expert parameters allreduce=False
            expert_sq += square
    torch.distributed.all_reduce(dense_sq, group=ps.get_model_parallel_group())
    torch.distributed.all_reduce(expert_sq, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense_sq + expert_sq).sqrt())


def grads_are_finite(ddp_model) -> bool:
    """Whether every rank's gradients are all finite. megatron's optimizer checks only under fp16 loss scaling; in
    bf16 it would step on a NaN or inf gradient and leave every weight NaN, so policy_update skips that step."""
    buffers = ddp_model.buffers + ddp_model.expert_parallel_buffers
    # The sum of a buffer is NaN or inf if any entry is, and needs no buffer-sized temporary: isfinite(grad_data)
    # would allocate a bool per gradient (gigabytes per GPU for Qwen3-30B-A3B) at the step's memory peak.
    flags = [torch.isfinite(b.grad_data.sum()) for b in buffers if b.grad_data is not None]
    finite = torch.stack(flags).all().to(torch.int32)  # on the buffers' device, as the collective's backend needs
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def policy_update(
    ddp_model,
    optimizer,
    micro_batches: Sequence[PolicyMicroBatch],
    *,
    loss_name: str,
    clip_eps_low: float,
    clip_eps_high: float,
    global_batch_size: int,
    dp_size: int,
    temperature: float = 1.0,
    rollout_is_cap: float | None = None,
) -> dict[str, float]:
    """Accumulate gradients over `micro_batches`, sync them, clip and step once. Returns this rank's metrics. A step
    whose gradients are not all finite on every rank is skipped (`update_skipped` 1, `grad_norm` NaN).

    With `rollout_is_cap`, micro-batches that carry `rollout_log_probs` get the loss's rollout importance correction
    (OpenRLHF's `--algo.advantage.is_correction_level seq`, capped at its high threshold); without it they are ignored.
    """
    from megatron.core.distributed import finalize_model_grads

    from openrlhf_gmpo.megatron import pipeline

    if not micro_batches:
        raise ValueError("policy_update needs at least one micro-batch")

    def loss_of(mb: PolicyMicroBatch, log_probs: torch.Tensor):
        return compute_policy_loss(
            loss_name,
            log_probs,
            mb.old_log_probs,
            mb.advantages,
            mb.action_mask,
            clip_eps_low=clip_eps_low,
            clip_eps_high=clip_eps_high,
            global_batch_size=global_batch_size,
            dp_size=dp_size,
            **_rollout_correction(mb.rollout_log_probs, rollout_is_cap),
        )

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    if pipeline.is_pipelined():
        # megatron's schedule ends with finalize_model_grads itself.
        results = pipeline.pipeline_forward_backward(ddp_model, micro_batches, loss_of, temperature=temperature)
    else:
        results = _forward_backward(ddp_model, micro_batches, loss_of, temperature)
        # The DP (and expert-DP) reduction, and over TP the gradients of weights every TP rank holds whole but sees
        # only its heads' share of: the q/k norms (and with sequence parallelism every norm).
        finalize_model_grads([ddp_model])
    if grads_are_finite(ddp_model):
        updated, grad_norm, _ = optimizer.step()
    else:
        updated, grad_norm = False, float("nan")
    totals: dict[str, float] = {}
    for _, metrics in results:
        for key, value in metrics.items():
            totals[key] = _combine(key, totals.get(key), value, len(results))
    # Summed over micro-batches and averaged over DP ranks this is the loss of the whole batch.
    loss_sum = sum(loss for loss, _ in results)
    totals.update(policy_loss=loss_sum, grad_norm=float(grad_norm), update_skipped=float(not updated))
    return totals


def _forward_backward(ddp_model, micro_batches, loss_of, temperature: float) -> list[tuple[float, dict[str, float]]]:
    """One stage: forward and backward of each micro-batch in turn (gradients accumulate); (loss, metrics) each."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # The aux loss (when its coefficient is > 0) gets the same per-micro-batch weight as the policy loss; shaped and
    # placed as megatron's pipeline schedule sets it, since the scale is one tensor copied into from then on.
    device = micro_batches[0].sequences.device
    MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 1.0 / len(micro_batches), device=device))
    results = []
    for mb in micro_batches:
        replay = nullcontext() if mb.routing is None else routing_replay.replaying(mb.routing, mb.attention_mask)
        with replay as backward_phase:
            log_probs = action_log_probs(
                ddp_model, mb.sequences, mb.attention_mask, mb.action_mask.shape[1], temperature=temperature
            )
            loss, metrics = loss_of(mb, log_probs)
            if backward_phase is not None:
                backward_phase()
            loss.backward()
        results.append((loss.item(), {key: value.item() for key, value in metrics.items()}))
    return results


def _rollout_correction(rollout_log_probs, cap: float | None) -> dict:
    if cap is None or rollout_log_probs is None:
        return {}
    return {"rollout_log_probs": rollout_log_probs, "rollout_is_cap": cap}


def _combine(key: str, total: float | None, value: float, count: int) -> float:
    """Fold one micro-batch's metric in: extremes stay extremes, everything else is a mean over micro-batches."""
    if total is None:
        return value if key.endswith(("_min", "_max")) else value / count
    if key.endswith("_min"):
        return min(total, value)
    if key.endswith("_max"):
        return max(total, value)
    return total + value / count
