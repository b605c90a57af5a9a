"""Pipeline parallelism (pp > 1) for the megatron backend: megatron-core's 1F1B schedule over our micro-batches.

Each rank holds a slice of the layers. megatron-core's schedule (`get_forward_backward_func`) sends activations from
stage to stage and interleaves forwards and backwards; only the last stage has logits, so it alone computes
log-probs and losses. What it measures is sent to the other stages, so every rank returns what it would at pp = 1.

Every stage of a data-parallel replica must run the same micro-batches in the same order. OpenRLHF hands each rank
its own chunk, so the actor first pools its replica's chunks with `gather_over_pipeline`.

Routing replay: each stage records and replays the routers of its own layers. The schedule interleaves micro-batches
(stage s runs the forwards of up to pp - s of them before their backwards), so the replayed experts are set per
micro-batch just before its forward; megatron's routers queue them for the recomputation in the backward, which
takes them in forward order, and the backward of each micro-batch switches the routers to that queue first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openrlhf_gmpo.megatron import routing_replay
from openrlhf_gmpo.megatron.logprobs import ModelInputs, check_temperature, log_probs_from_logits, model_inputs


def is_pipelined() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() > 1


def gather_over_pipeline(obj: Any) -> list:
    """Every pipeline stage's `obj`, in stage order, on every stage (pickled: meant for host-side batches)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    out = [None] * torch.distributed.get_world_size(group=group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def from_last_stage(obj: Any) -> Any:
    """The last pipeline stage's `obj` on every stage of this rank's pipeline."""
    from megatron.core import parallel_state as ps

    holder = [obj if ps.is_pipeline_last_stage() else None]
    torch.distributed.broadcast_object_list(
        holder, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return holder[0]


@dataclass
class _Step:
    """One micro-batch of the schedule: the model's inputs, what the last stage does with its logits (megatron's
    `loss_func`), and the routing to replay (per sequence) or the list to record it into."""

    inputs: ModelInputs
    loss_func: Callable
    replay: list[torch.Tensor] | None = None
    record_into: list | None = None


def pipeline_log_probs(
    model,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    temperature: float = 1.0,
    routing_into: list | None = None,
) -> list[torch.Tensor]:
    """`token_log_probs` of each (input_ids, attention_mask) batch, one micro-batch each, on every stage (host).
    With `routing_into`, each batch's routing per sequence (this stage's layers) is appended to it, a list per batch,
    as `routing_replay.recording` gives it."""
    check_temperature(temperature)

    def log_probs_of(inputs: ModelInputs) -> Callable:
        def loss_func(logits):
            log_probs = log_probs_from_logits(logits, inputs, temperature)
            return torch.zeros((), device=log_probs.device), log_probs.cpu()

        return loss_func

    steps = []
    for batch in batches:
        inputs = model_inputs(model.config, *batch)
        steps.append(_Step(inputs, log_probs_of(inputs), record_into=None if routing_into is None else []))
    with torch.no_grad():
        log_probs = from_last_stage(_run_schedule(model, steps, forward_only=True))
    if routing_into is not None:
        routing_into.extend(step.record_into for step in steps)
    return log_probs


def pooled_log_probs(model, input_ids, attention_mask, *, device, temperature: float = 1.0, routing_into=None):
    """`token_log_probs` of this rank's batch, computed with the batches of the other stages of its replica (one
    micro-batch each: every stage must run them all); on CPU. With `routing_into`, the routing of every pooled
    sequence on this stage is appended to it, as (input_ids, attention_mask, per-sequence routing) per pooled batch."""
    from megatron.core import parallel_state as ps

    batches = gather_over_pipeline((input_ids.cpu(), attention_mask.cpu()))
    on_device = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    routing = None if routing_into is None else []
    log_probs = pipeline_log_probs(model, on_device, temperature=temperature, routing_into=routing)
    if routing_into is not None:
        routing_into.extend((ids, mask, r) for (ids, mask), r in zip(batches, routing, strict=True))
    return log_probs[ps.get_pipeline_model_parallel_rank()]


def pipeline_forward_backward(
    model,
    micro_batches: Sequence,
    loss_of: Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    temperature: float = 1.0,
) -> list[tuple[float, dict[str, float]]]:
    """Forward and backward of every micro-batch (gradients accumulate in the DDP buffers and are then reduced, the
    tied embedding's over its first and last stage too); (loss, metrics) per micro-batch on every stage.

    `micro_batches` have `sequences`, `attention_mask`, `action_mask` and `routing` (replayed when not None);
    `loss_of(micro_batch, action_log_probs)` returns the loss to differentiate and its metrics, as
    `compute_policy_loss` does.
    """
    from megatron.core.distributed import finalize_model_grads

    count = len(micro_batches)

    def loss_func_for(mb, inputs: ModelInputs) -> Callable:
        def loss_func(logits):
            log_probs = log_probs_from_logits(logits, inputs, temperature)[:, -mb.action_mask.shape[1] :]
            loss, metrics = loss_of(mb, log_probs)
            # The schedule divides the returned loss by the number of micro-batches; ours is already the share of
            # the global batch, as at pp = 1, so that division is undone here.
            return loss * count, (loss.item(), {key: value.item() for key, value in metrics.items()})

        return loss_func

    steps = []
    for mb in micro_batches:
        inputs = model_inputs(model.config, mb.sequences, mb.attention_mask)
        steps.append(_Step(inputs, loss_func_for(mb, inputs), replay=mb.routing))
    # The schedule calls these: no gradient sync between micro-batches, then DP and embedding-group reductions.
    model.config.no_sync_func = model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return from_last_stage(_run_schedule(model, steps, forward_only=False))


class _ReplayInBackward(torch.autograd.Function):
    """The identity on a stage's output; its backward, the first step of the micro-batch's backward, switches the
    routers to replaying the queued experts for the recomputation that follows."""

    @staticmethod
    def forward(ctx, output):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        routing_replay.replay_backward_phase()
        return grad


def _run_schedule(model, steps: list[_Step], *, forward_only: bool) -> list:
    """What each step's loss function returned (as the second item), in order, on the last stage; [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not steps:
        return []

    recomputes = model.config.recompute_granularity is not None

    def forward_step(data_iterator, stage_model):
        step = next(data_iterator)
        if step.replay is not None:
            routing_replay.start_replay(step.replay, step.inputs.attention_mask)
        elif step.record_into is not None:
            routing_replay.start_recording()
        output = step.inputs.run(stage_model)
        if step.record_into is not None:
            step.record_into.extend(routing_replay.take_recorded(step.inputs.attention_mask))
            routing_replay.stop()
        if step.replay is not None:
            if not recomputes:
                routing_replay.drop_backward_queue()
            output = _ReplayInBackward.apply(output)
        return output, step.loss_func

    try:
        # Shapes vary per micro-batch: the stages tell each other what they send (config.variable_seq_lengths).
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(steps),
            model=[model],
            num_microbatches=len(steps),
            seq_length=max(step.inputs.input_ids.shape[1] for step in steps),
            micro_batch_size=max(step.inputs.input_ids.shape[0] for step in steps),
            forward_only=forward_only,
        )
    finally:  # routers route freely again, also after an error mid-schedule
        if any(step.replay is not None or step.record_into is not None for step in steps):
            routing_replay.stop()
