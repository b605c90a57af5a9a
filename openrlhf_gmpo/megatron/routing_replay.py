"""Routing replay: the update pass routes each token to the experts the old-policy pass chose.

Without it, the new policy's router may pick other experts for a token than the old policy did, and the importance
ratio pi_new / pi_old then compares two different sub-networks; with top-8 of 128 experts that happens for a large
share of tokens after a few updates, which is one reason MoE RL destabilises. megatron-core 0.19 implements the
mechanism (`moe_enable_routing_replay`, `RouterReplay`: record top-k indices per layer, or replay given ones and take
the router's current scores at them, so the router still gets gradients); this module stores what a pass recorded
per sequence, over its valid tokens, so the update can re-batch sequences differently from the old-policy pass.

Routers see tokens in megatron's [S, b] order, flattened to S*b rows, of the batch as `token_log_probs` hands it to
the model (each row's valid tokens moved to its front, `left_align`); this needs the full sequence on every rank,
i.e. no sequence parallelism (tp == 1).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from openrlhf_gmpo.megatron.logprobs import aligned_mask


def _replay():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    if not RouterReplay.global_router_replay_instances:
        raise RuntimeError("routing replay needs a model built with MoEOptions(routing_replay=True)")
    return RouterReplay, RouterReplayAction


def split_per_sequence(layer_indices: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer [S*b, k] router indices -> one [layers, n_valid_i, k] tensor per sequence (padding dropped)."""
    seq_len, batch = attention_mask.shape[1], attention_mask.shape[0]
    stacked = torch.stack([idx.reshape(seq_len, batch, -1) for idx in layer_indices])  # [layers, S, b, k]
    mask = aligned_mask(attention_mask).cpu()
    return [stacked[:, mask[i], i].cpu() for i in range(batch)]


def join_per_sequence(per_sequence: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `split_per_sequence` for a new batch of the recorded sequences: per-layer [S*b, k]."""
    batch, seq_len = attention_mask.shape
    if len(per_sequence) != batch:
        raise ValueError(f"{len(per_sequence)} recorded sequences for a batch of {batch}")
    layers, _, top_k = per_sequence[0].shape
    # Padding rows route to experts 0..k-1: any distinct choice works, a repeated expert would break the dispatch.
    out = torch.arange(top_k, dtype=per_sequence[0].dtype).expand(layers, seq_len, batch, top_k).clone()
    mask = aligned_mask(attention_mask).cpu()
    for i, indices in enumerate(per_sequence):
        if indices.shape[1] != int(mask[i].sum()):
            raise ValueError(f"sequence {i}: {indices.shape[1]} recorded tokens, the mask has {int(mask[i].sum())}")
        out[:, mask[i], i] = indices
    device = attention_mask.device
    return [layer.reshape(seq_len * batch, top_k).to(device) for layer in out]


@contextmanager
def recording(attention_mask: torch.Tensor, into: list):
    """Within the block, one forward over `attention_mask`'s batch records its routing; on exit the per-sequence
    indices are appended to `into`."""
    start_recording()
    try:
        yield
        into.extend(take_recorded(attention_mask))
    finally:
        stop()


@contextmanager
def replaying(per_sequence: list[torch.Tensor], attention_mask: torch.Tensor):
    """Within the block, one forward over this batch routes like the recorded sequences. Run its backward inside the
    block too, after calling the yielded `backward_phase()`: with activation recomputation the backward re-runs the
    routers, which must replay the same experts (megatron's REPLAY_BACKWARD)."""
    start_replay(per_sequence, attention_mask)
    try:
        yield replay_backward_phase
    finally:
        stop()


# The steps of those two blocks, for megatron's pipeline schedule, which interleaves the forwards and backwards of
# several micro-batches (pipeline.py): each micro-batch's targets queue up in the routers, and its backward takes
# them in forward order.


def start_recording() -> None:
    router_replay, action = _replay()
    router_replay.set_global_router_replay_action(action.RECORD)


def take_recorded(attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """What the last forward recorded, per sequence of its batch."""
    router_replay, _ = _replay()
    return split_per_sequence(router_replay.get_recorded_data(), attention_mask)


def start_replay(per_sequence: list[torch.Tensor], attention_mask: torch.Tensor) -> None:
    """The next forward routes this batch like the recorded sequences; its recomputation in the backward too."""
    router_replay, action = _replay()
    router_replay.set_replay_data(join_per_sequence(per_sequence, attention_mask))
    router_replay.set_global_router_replay_action(action.REPLAY_FORWARD)


def drop_backward_queue() -> None:
    """Forget the targets queued for recomputation (without it nothing takes them, and each micro-batch's would
    stay on the GPU until `stop()`)."""
    router_replay, _ = _replay()
    for router in router_replay.global_router_replay_instances:
        router.replay_backward_list = []


def replay_backward_phase() -> None:
    """From here on, routers re-run by activation recomputation take the queued targets, oldest first."""
    router_replay, action = _replay()
    router_replay.set_global_router_replay_action(action.REPLAY_BACKWARD)


def stop() -> None:
    """Routers route freely again; recorded and queued indices are dropped."""
    router_replay, _ = _replay()
    router_replay.clear_global_router_replay_action()
    router_replay.clear_global_indices()
