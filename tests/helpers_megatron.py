"""Test-only helpers for running megatron-core on CPU with gloo process groups.

megatron-core assumes CUDA in a few places that do not matter for the maths; `install_cpu_shims()`
(helpers_cpu_shims.py) replaces exactly those. Everything else (layers, router, dispatcher, DDP) is the real
megatron-core code.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

# install_cpu_shims: tests and benches call it as hm.install_cpu_shims.
from helpers_cpu_shims import cuda_reported_available, host_cuda_tensors, install_cpu_shims

TINY_MOE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def one_process_world():
    """A one-process gloo world with megatron's parallel state (TP = EP = PP = 1, as the backend builds it), for a
    test module; torn down on exit. A world some other test left initialised is reused and left alone."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron.parallel import ParallelSizes, initialize_parallel_state

    owns_world = not torch.distributed.is_initialized()
    if owns_world:
        # An in-process store: no port, and no MASTER_PORT left in os.environ for subprocesses of later tests.
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    initialize_parallel_state(ParallelSizes(1))
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_world:
            torch.distributed.destroy_process_group()


def spawn_suite(worker, processes: int, out_dir) -> list[dict]:
    """Run `worker(rank, processes, port, out_dir)` on `processes` spawned gloo ranks; each saves its results to
    out_dir/rank{r}.pt, returned here by rank."""
    torch.multiprocessing.spawn(worker, args=(processes, free_port(), str(out_dir)), nprocs=processes)
    return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(processes)]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group; call first thing in a spawned worker."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    install_cpu_shims()
    host_cuda_tensors()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def tiny_hf_moe(seed: int = 0, **overrides):
    """A tiny random Qwen3-MoE HF model in fp32, the same on every process for a given seed."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{**TINY_MOE, **overrides})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float().eval()
    # HF's default init leaves the norms at 1 and the router near uniform; perturb them so a wrong mapping shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
            elif ".mlp.experts." in name:  # large enough that sending a token to a wrong expert shows in log-probs
                param.normal_(0.0, 0.3)
    return model


def tiny_hf_moe_top1_tied():
    return tiny_hf_moe(num_experts_per_tok=1, norm_topk_prob=False, tie_word_embeddings=True)


def tiny_hf_dense(seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings")
    config = Qwen3Config(**{**{k: TINY_MOE[k] for k in keys}, **overrides})
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def hf_token_log_probs(
    hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each next token under the HF model, [B, L-1]; logits divided by the sampling temperature first,
    as OpenRLHF's Actor does."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# ---- the distributed suite: one spawn of 2 gloo processes runs every layout, tests read its results -------------


def policy_batch(seed: int = 1):
    """4 sequences of 12 tokens, the last 6 the response; rows 1 and 3 left-padded, row 2's response ends early."""
    g = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, TINY_MOE["vocab_size"], (4, 12), generator=g)
    attention_mask = torch.ones(4, 12, dtype=torch.bool)
    attention_mask[1, :2] = False
    attention_mask[3, :4] = False
    action_mask = torch.ones(4, 6, dtype=torch.bool)
    action_mask[2, 4:] = False
    old_log_probs = -3.0 + 0.3 * torch.randn(4, 6, generator=g)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return dict(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                old_log_probs=old_log_probs, advantages=advantages)  # fmt: skip


UPDATE = dict(loss_name="gmpo", clip_eps_low=0.4, clip_eps_high=0.4, lr=1e-3, clip_grad=0.1)


def one_row_micro_batches(batch: dict, rows) -> list:
    """policy_batch's `rows` as PolicyMicroBatches of one sequence each."""
    from openrlhf_gmpo.megatron.train import PolicyMicroBatch

    keys = ("sequences", "attention_mask", "action_mask", "old_log_probs", "advantages")
    return [PolicyMicroBatch(*(batch[key][row : row + 1] for key in keys)) for row in rows]


def valid_prediction_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1]: the target token and its previous token are real (a first token after padding has no context)."""
    return attention_mask[:, 1:] & attention_mask[:, :-1]


def padded_both_sides(batch: dict) -> dict:
    """policy_batch with right padding added: row 2's last 2 tokens, row 3's last (row 3 is also left-padded)."""
    mask = batch["attention_mask"].clone()
    mask[2, -2:] = False
    mask[3, -1] = False
    return {**batch, "attention_mask": mask}


def _log_prob_error(model, hf, batch) -> float:
    from openrlhf_gmpo.megatron import pipeline
    from openrlhf_gmpo.megatron.logprobs import token_log_probs

    ids, mask = batch["sequences"], batch["attention_mask"]
    with torch.no_grad():
        if pipeline.is_pipelined():
            log_probs = pipeline.pipeline_log_probs(model, [(ids, mask)])[0]
        else:
            log_probs = token_log_probs(model, ids, mask)
    return (log_probs - hf_token_log_probs(hf, ids, mask))[valid_prediction_mask(mask)].abs().max().item()


def _eval_layout(hf, sizes, batch):
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.weights import iter_hf_weights, load_hf_weights

    initialize_parallel_state(sizes)
    hf_state = hf.state_dict()
    model = build_gpt_model(hf.config, sizes)
    load_hf_weights(model, hf_state, hf.config)
    model.eval()
    exported = dict(iter_hf_weights(model, hf.config))
    per_expert = dict(iter_hf_weights(model, hf.config, expert_layout="per_expert"))
    return {
        "log_prob_error": _log_prob_error(model, hf, batch),
        "log_prob_error_both_sides": _log_prob_error(model, hf, padded_both_sides(batch)),
        "export_mismatches": sorted(
            n for n in hf_state if n not in exported or not torch.equal(exported[n], hf_state[n])
        ),
        "export_extra": sorted(set(exported) - set(hf_state)),
        "per_expert": {n: t.clone() for n, t in per_expert.items() if ".experts." in n},
    }


def _export_only(hf, sizes):
    """Load and export without a forward: what each pipeline stage holds, and that every stage yields every tensor."""
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.weights import iter_hf_weights, load_hf_weights

    initialize_parallel_state(sizes)
    hf_state = hf.state_dict()
    model = build_gpt_model(hf.config, sizes)
    load_hf_weights(model, hf_state, hf.config)
    exported = dict(iter_hf_weights(model, hf.config))
    missing = torch.empty(0)
    return {
        "local_layers": len(model.decoder.layers),
        "export_mismatches": sorted(n for n in hf_state if not torch.equal(exported.get(n, missing), hf_state[n])),
        "export_extra": sorted(set(exported) - set(hf_state)),
    }


def _update(hf, sizes, batch, rank, routing_replay=False, nan_grad_on_rank=None, gpu_optimizer=False, aux_loss=0.0):
    """One policy update, each data-parallel replica on its share of the batch in micro-batches of 1; returns the
    metrics, the HF-named weights and gradients. `gpu_optimizer`: megatron's DDP buffers and distributed optimizer,
    as on GPUs (the worker must emulate CUDA tensors, helpers_cpu_shims.emulate_cuda_tensors). `aux_loss`: the
    load-balancing loss coefficient.
    `nan_grad_on_rank`: the gradient of that rank's first local expert turns NaN, as after an overflow in its
    forward; no other rank holds that expert, so only a check across ranks stops the others from stepping."""
    from megatron.core import parallel_state

    from openrlhf_gmpo.megatron.model import MoEOptions, build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.train import OptimizerOptions, build_optimizer, policy_update, wrap_ddp
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    initialize_parallel_state(sizes)
    model = build_gpt_model(hf.config, sizes, moe=MoEOptions(routing_replay=routing_replay, aux_loss_coef=aux_loss))
    load_hf_weights(model, hf.state_dict(), hf.config)
    with cuda_reported_available() if gpu_optimizer else contextlib.nullcontext():
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, OptimizerOptions(lr=UPDATE["lr"], clip_grad=UPDATE["clip_grad"]))
    if rank == nan_grad_on_rank:  # a tensor hook runs before DDP copies the gradient into its buffer
        expert = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight
        expert.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    rows = len(batch["sequences"]) // sizes.dp
    dp_rank = parallel_state.get_data_parallel_rank()
    micro_batches = one_row_micro_batches(batch, range(rows * dp_rank, rows * (dp_rank + 1)))
    metrics = policy_update(
        ddp, optimizer, micro_batches, loss_name=UPDATE["loss_name"], clip_eps_low=UPDATE["clip_eps_low"],
        clip_eps_high=UPDATE["clip_eps_high"], global_batch_size=4, dp_size=sizes.dp,
    )  # fmt: skip
    metrics["optimizer"] = type(optimizer).__name__
    return metrics, *hf_weights_and_gradients(model, hf.config)


def _optimizer_process_groups(hf, sizes):
    """The process groups megatron's optimizer asks for before anything else (on GPU; its optimizers need CUDA).

    `get_megatron_optimizer` runs this with `use_gloo_process_groups=True` by default: it needs gloo twins of the
    data-parallel groups, for its checkpoint gathers, and asserts if `initialize_parallel_state` did not create them.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.train import wrap_ddp

    initialize_parallel_state(sizes)
    ddp = wrap_ddp(build_gpt_model(hf.config, sizes))
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, [ddp], use_gloo_process_groups=True)
    return {name: group.size() for name, group in groups.items() if name.endswith("_gloo") and group is not None}


def _routing_replay_check(hf, sizes, batch):
    """Record routing with the HF router weights, then compare passes after changing the routers."""
    from openrlhf_gmpo.megatron import routing_replay
    from openrlhf_gmpo.megatron.logprobs import token_log_probs
    from openrlhf_gmpo.megatron.model import MoEOptions, build_gpt_model
    from openrlhf_gmpo.megatron.parallel import initialize_parallel_state
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    initialize_parallel_state(sizes)
    model = build_gpt_model(hf.config, sizes, moe=MoEOptions(routing_replay=True))
    load_hf_weights(model, hf.state_dict(), hf.config)
    model.eval()
    ids, mask = batch["sequences"], batch["attention_mask"]
    recorded = []
    with torch.no_grad(), routing_replay.recording(mask, into=recorded):
        token_log_probs(model, ids, mask)
    # Change the last layer's router only, so that its input (the hidden states) stays what was recorded.
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.router.weight")][-1:]
    # Replay on a re-batched order (rows reversed, then two micro-batches with their common padding trimmed).
    order = [3, 2, 1, 0]
    out = {}
    # x2 and -1 are exact in floating point: doubling keeps every top-k choice, negating changes most of them.
    for label, factor in (("doubled", 2.0), ("negated", -1.0)):
        with torch.no_grad():
            for p in routers:
                p.mul_(factor)
        free, replayed = [], []
        for rows in (order[:2], order[2:]):
            start = int((~mask[rows]).all(0).sum())  # leading columns that are padding in every row
            sub_ids, sub_mask = ids[rows, start:], mask[rows, start:]
            with torch.no_grad():
                free.append(token_log_probs(model, sub_ids, sub_mask)[valid_prediction_mask(sub_mask)])
                with routing_replay.replaying([recorded[r] for r in rows], sub_mask):
                    replayed.append(token_log_probs(model, sub_ids, sub_mask)[valid_prediction_mask(sub_mask)])
        out[label] = (torch.cat(free) - torch.cat(replayed)).abs().max().item()
        with torch.no_grad():
            for p in routers:
                p.div_(factor)
    return out


def suite_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Runs every CPU check of the megatron backend on 2 ranks; rank r saves its results to out_dir/rank{r}.pt."""
    from openrlhf_gmpo.megatron.parallel import ParallelSizes

    init_gloo(rank, world_size, port)
    batch = policy_batch()
    moe, dense = tiny_hf_moe(), tiny_hf_dense()
    results = {
        "eval_ep1": _eval_layout(moe, ParallelSizes(world_size), batch),
        "eval_ep2": _eval_layout(moe, ParallelSizes(world_size, ep=2), batch),
        "eval_tp2": _eval_layout(moe, ParallelSizes(world_size, tp=2), batch),
        "eval_dense_tp2": _eval_layout(dense, ParallelSizes(world_size, tp=2), batch),
        # The CountDown models' routing and head: top-1 of the full softmax, lm_head tied to the embedding.
        "eval_top1_tied_ep2": _eval_layout(tiny_hf_moe_top1_tied(), ParallelSizes(world_size, ep=2), batch),
        "export_pp2": _export_only(moe, ParallelSizes(world_size, pp=2)),
        "update_ep1": _update(moe, ParallelSizes(world_size), batch, rank),
        "update_ep2": _update(moe, ParallelSizes(world_size, ep=2), batch, rank),
        # Dense TP2 (without Transformer Engine, so without sequence parallelism): the q/k norms are whole on each TP
        # rank but see only its heads, so their gradients must be summed over TP.
        "update_dense_tp2": _update(dense, ParallelSizes(world_size, tp=2), batch, rank),
        "update_etp2": _update(moe, ParallelSizes(world_size, etp=2), batch, rank),  # each expert split over 2 ranks
        # The load-balancing loss on, with the same one-row micro-batches: 2 per replica at EP2 (DP 2), scaled by
        # policy_update; 4 on the one replica at PP2, scaled by megatron's pipeline schedule.
        "aux_loss_ep2": _update(moe, ParallelSizes(world_size, ep=2), batch, rank, aux_loss=0.1),
        "aux_loss_pp2": _update(moe, ParallelSizes(world_size, pp=2), batch, rank, aux_loss=0.1),
        "update_ep2_nan_on_rank1": _update(moe, ParallelSizes(world_size, ep=2), batch, rank, nan_grad_on_rank=1),
        "replay_ep2": _routing_replay_check(moe, ParallelSizes(world_size, ep=2), batch),
        "optimizer_groups_ep2": _optimizer_process_groups(moe, ParallelSizes(world_size, ep=2)),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


# ---- the policy actor on 2 gloo processes ------------------------------------------------------------------------


def hf_action_log_probs(model, batch, num_actions: int = 6) -> torch.Tensor:
    """Differentiable HF log-probs of the last `num_actions` tokens, (B, A)."""
    mask = batch["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["sequences"], attention_mask=mask, position_ids=position_ids).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["sequences"][:, 1:, None]).squeeze(-1)
    return log_probs[:, -num_actions:]


def hf_reference_update(model, batch, *, old_log_probs, lr: float, clip_grad: float, loss_name: str = "gmpo"):
    """One policy step in one process on the whole batch: HF model, torch clip, AdamW(betas 0.9/0.95, eps 1e-8).
    Returns the grad norm before clipping and the state after the step; the clipped gradients stay in `.grad`."""
    from openrlhf_gmpo.losses import compute_policy_loss

    loss, _ = compute_policy_loss(
        loss_name, hf_action_log_probs(model, batch), old_log_probs, batch["advantages"], batch["action_mask"],
        clip_eps_low=0.4, clip_eps_high=0.4, global_batch_size=batch["sequences"].shape[0], dp_size=1,
    )  # fmt: skip
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    return grad_norm.item(), {n: p.detach().clone() for n, p in model.state_dict().items()}


def hf_policy_batch_update(model):
    """`hf_reference_update` of `model` on `policy_batch()` with UPDATE's settings: the grad norm before clipping,
    the state after the step and the clipped gradients by parameter name."""
    batch = policy_batch()
    norm, state = hf_reference_update(
        model, batch, old_log_probs=batch["old_log_probs"], lr=UPDATE["lr"], clip_grad=UPDATE["clip_grad"]
    )
    return norm, state, {name: param.grad for name, param in model.named_parameters()}


def assert_same_update(update, reference, label: str = "") -> None:
    """`_update`'s (metrics, weights, gradients) is `hf_policy_batch_update`'s step: grad norm to rel 1e-5, every
    clipped gradient to rel 1e-4 (a first AdamW step moves weights by about lr * sign(grad), so the weights alone
    would not see a gradient scaled wrongly), weights within 1e-5."""
    import pytest

    metrics, after, grads = update
    norm, state, reference_grads = reference
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5), label
    assert_same_step(after, grads, state, reference_grads, label)


def assert_same_step(weights, grads, reference_weights, reference_grads, label: str = "", weight_atol=1e-5) -> None:
    """The same gradients (rel 1e-4) and the same weights after the step (within `weight_atol`), by HF name."""
    assert grads.keys() == reference_grads.keys(), label
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-8, rtol=1e-4, msg=f"{label} {name}")
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], atol=weight_atol, rtol=0, msg=f"{label} {name}")


def hf_weights_and_gradients(model, hf_config) -> tuple[dict, dict]:
    """A megatron model's weights and its reduced (clipped, after the step) gradients, HF-named, as full tensors."""
    from openrlhf_gmpo.megatron.weights import iter_hf_weights

    weights = {n: t.clone() for n, t in iter_hf_weights(model, hf_config)}
    return weights, {n: t.clone() for n, t in iter_hf_weights(_Gradients(model), hf_config)}


class _Gradients:
    """A megatron model's reduced (and, after the step, clipped) gradients under its parameter names, so the HF
    mapping (`iter_hf_weights`, which reads only `named_parameters`) exports them like weights."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return ((name, param.main_grad) for name, param in self.model.named_parameters())


def experience(batch, rows, old_log_probs, rollout_log_probs=None):
    from openrlhf.trainer.ppo_utils.experience import Experience

    advantages = batch["advantages"][rows, None] * batch["action_mask"][rows]  # OpenRLHF's are per token
    return Experience(
        sequences=batch["sequences"][rows],
        attention_mask=batch["attention_mask"][rows].long(),
        action_mask=batch["action_mask"][rows],
        action_log_probs=old_log_probs,
        advantages=advantages,
        rollout_log_probs=rollout_log_probs,
        info={"reward": batch["advantages"][rows].clone()},
    )


def experience_for_rank(rank: int, old_log_probs: torch.Tensor, rollout_log_probs=None):
    """OpenRLHF's chunk for data-parallel rank `rank` of `policy_batch()`, as one Experience (2 sequences)."""
    return experience(policy_batch(), [2 * rank, 2 * rank + 1], old_log_probs, rollout_log_probs)


def forward_chunk(rank: int) -> dict:
    """What RayActorGroup sends to `execute_batch("forward", ...)`: lists of per-micro-batch tensors."""
    batch = policy_batch()
    rows = [2 * rank, 2 * rank + 1]
    return {k: [batch[k][rows]] for k in ("sequences", "action_mask", "attention_mask")}
