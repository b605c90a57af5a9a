"""One algorithm's RL run: sample, score, group-normalise, several mini-batch updates per batch, log, checkpoint.

Every random draw is derived from (seed, purpose, algorithm, step), and the model, optimizer, RNG states and the metrics
so far are checkpointed together, so a killed run resumes exactly where the uninterrupted one would be.
"""

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from openrlhf_gmpo.countdown.scorer import SCORE_CORRECT
from openrlhf_gmpo.losses import compute_policy_loss
from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import AlgoConfig, StabilityConfig
from openrlhf_gmpo.stability.data import decode_responses, encode_prompt, evaluate, rewards_for
from openrlhf_gmpo.stability.engine import PolicyEngine, TokenBatch
from openrlhf_gmpo.stability.rl_math import group_advantages, k3_kl, masked_mean

# How the per-mini-batch loss metrics become one number per step: ratio extremes over the whole step, the rest averaged.
_REDUCE = {"token_ratio_min": min, "seq_ratio_min": min, "token_ratio_max": max, "seq_ratio_max": max}
TIMING_KEYS = ("step_time_s", "generate_s", "score_s", "update_s")  # wall-clock fields: never compared across runs


class NonFiniteLogProbs(RuntimeError):
    """The policy produced NaN/inf log-probs: the run has diverged and further updates mean nothing."""


# rl settings that do not change what is trained: how long, how often to checkpoint, how the decoder caches.
_NOT_TRAINING = ("steps", "checkpoint_every", "decode_cache")


def training_fingerprint(cfg: StabilityConfig, algo_name: str) -> str:
    """What an algorithm's checkpoint must match to be resumed: everything that shapes its training, and nothing
    else, so a run can be re-judged with new verdict bounds, extended to more steps, or joined by other algorithms."""
    settings = cfg.to_dict()
    rl = {key: value for key, value in settings["rl"].items() if key not in _NOT_TRAINING}
    parts = (settings[key] for key in ("seed", "threads", "model", "data", "sft"))
    return state.config_fingerprint(*parts, rl, algo_name, settings["algos"][algo_name])


def resumable_checkpoint(cfg: StabilityConfig, algo_name: str, path: Path, target_steps: int, mmap: bool = False):
    """The checkpoint `algo_name` resumes from, or None to start afresh; SystemExit, naming why, for one written under
    other training settings or holding more than target_steps steps. mmap: map the tensors instead of reading them
    (a check before the warm start)."""
    if not path.is_file():
        return None
    saved = state.load(path, mmap=mmap)
    if saved["fingerprint"] != training_fingerprint(cfg, algo_name):
        raise SystemExit(
            f"{path} was written with other training settings (seed, threads, model, data, sft, rl "
            f"or algos.{algo_name}); rerun with --fresh to start over"
        )
    if saved["step"] > target_steps:
        raise SystemExit(
            f"{path} already holds {saved['step']} steps of {algo_name}, more than --steps "
            f"{target_steps}; ask for at least {saved['step']} steps, or rerun with --fresh"
        )
    return saved


def run_algo(
    engine: PolicyEngine,
    tokenizer,
    cfg: StabilityConfig,
    algo_name: str,
    train_tasks,
    eval_tasks,
    start_weights: dict[str, torch.Tensor],
    checkpoint_path: Path,
    target_steps: int,
    emit: Callable[[dict], None],
    on_step_end: Callable[[str, int], None] | None = None,
    log=print,
) -> list[dict]:
    """Train `algo_name` from start_weights (or its checkpoint) up to target_steps; returns all of its step records."""
    algo, rl = cfg.algos[algo_name], cfg.rl
    fingerprint = training_fingerprint(cfg, algo_name)
    engine.load_model_state(start_weights)
    engine.freeze_reference()  # KL is measured against the warm-start weights
    engine.reset_optimizer(rl.lr, rl.weight_decay, rl.grad_clip)
    records, step, diverged = [], 0, False
    saved = resumable_checkpoint(cfg, algo_name, checkpoint_path, target_steps)
    if saved is not None:
        engine.load_model_state(saved["model"])
        engine.load_optimizer_state(saved["optimizer"])
        state.restore_rng(saved["rng"])
        records, step, diverged = saved["records"], saved["step"], saved["diverged"]
        log(f"{algo_name}: resuming after step {step}")
    for record in records:
        emit(record)

    def checkpoint():
        payload = {
            "fingerprint": fingerprint,
            "step": step,
            "diverged": diverged,
            "records": records,
            "model": engine.model_state(),
            "optimizer": engine.optimizer_state(),
            "rng": state.capture_rng(),
        }
        state.atomic_save(payload, checkpoint_path)

    while step < target_steps and not diverged:
        step += 1
        record = rl_step(engine, tokenizer, cfg, algo_name, algo, train_tasks, step)
        diverged = record["diverged"]
        if step % rl.eval_every == 0 or step == target_steps or diverged:
            record.update(evaluate(engine, tokenizer, eval_tasks, rl.max_new_tokens))
        records.append(record)
        emit(record)
        log(_summary(record))
        if step % rl.checkpoint_every == 0 or step == target_steps or diverged:
            checkpoint()
        if on_step_end is not None:
            on_step_end(algo_name, step)
    if diverged:
        log(f"{algo_name}: stopped at step {step}: the policy's log-probs are no longer finite")
    return records


def rl_step(
    engine: PolicyEngine, tokenizer, cfg: StabilityConfig, algo_name: str, algo: AlgoConfig, train_tasks, step: int
) -> dict:
    rl, group = cfg.rl, cfg.rl.samples_per_prompt
    started = time.perf_counter()
    # The same prompts for every algorithm at a given step; sampling noise differs per algorithm.
    tasks = random.Random(state.derive_seed(cfg.seed, "prompts", step)).sample(train_tasks, rl.prompts_per_step)
    tasks = [t for t in tasks for _ in range(group)]  # prompt-major: the group of prompt i is rows i*G .. i*G+G-1
    prompts = [encode_prompt(tokenizer, t) for t in tasks]
    batch = engine.generate(
        prompts,
        max_new_tokens=rl.max_new_tokens,
        greedy=False,
        seed=state.derive_seed(cfg.seed, "sample", algo_name, step),
    )
    generated = time.perf_counter()
    rewards = rewards_for(decode_responses(tokenizer, batch), tasks)
    old = engine.score(batch, with_stats=True)
    ref = engine.score(batch, reference=True)
    mask = batch.action_mask
    record = {
        "algo": algo_name,
        "step": step,
        "train_reward": rewards.mean().item(),
        "train_accuracy": (rewards == SCORE_CORRECT).float().mean().item(),
        "response_length": mask.sum(dim=1).float().mean().item(),
        "entropy": masked_mean(old.entropy, mask).item(),
        "kl_ref": masked_mean(k3_kl(old.log_probs, ref.log_probs), mask).item(),
        **old.router,
    }
    scored = time.perf_counter()  # after the .item() calls above, so GPU work is finished
    advantages = group_advantages(rewards, group, rl.adv_eps).to(mask.device)
    updates = _updates(engine, batch, old.log_probs, advantages, algo, cfg, algo_name, step)
    record.update(updates)
    record["diverged"] = not all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    record.update(
        generate_s=generated - started,
        score_s=scored - generated,
        update_s=time.perf_counter() - scored,
        step_time_s=time.perf_counter() - started,
    )
    return record


def _updates(engine, batch: TokenBatch, old_log_probs, advantages, algo: AlgoConfig, cfg, algo_name, step) -> dict:
    """rl.epochs passes over the rollout batch in shuffled mini-batches, one optimizer step each."""
    rl = cfg.rl
    n = batch.input_ids.shape[0]
    generator = torch.Generator().manual_seed(state.derive_seed(cfg.seed, "minibatch", algo_name, step))
    per_update: list[dict[str, float]] = []
    grad_norms = []
    for _ in range(rl.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, rl.mini_batch_size):
            index = order[start : start + rl.mini_batch_size].to(batch.input_ids.device)
            sub = batch.select(index)

            def loss_fn(log_probs, index=index, sub=sub):
                if not torch.isfinite(log_probs[sub.action_mask.bool()]).all():
                    raise NonFiniteLogProbs()
                return compute_policy_loss(
                    algo.loss,
                    log_probs,
                    old_log_probs[index],
                    advantages[index],
                    sub.action_mask,
                    clip_eps_low=algo.clip_eps_low,
                    clip_eps_high=algo.clip_eps_high,
                )

            try:
                grad_norm, metrics = engine.train_step(sub, loss_fn)
            except NonFiniteLogProbs:
                return {
                    "grad_norm": math.nan,
                    "grad_norm_max": math.nan,
                    "token_ratio_min": math.nan,
                    "token_ratio_max": math.nan,
                }
            grad_norms.append(grad_norm)
            per_update.append(metrics)
    out = {key: _REDUCE.get(key, _mean)([m[key] for m in per_update]) for key in per_update[0]}
    out["grad_norm"] = _mean(grad_norms)
    out["grad_norm_max"] = max(grad_norms)
    out["updates"] = len(per_update)
    # Before any update the policy is the one that scored the rollouts, so these ratios should be 1: their distance
    # from 1 is what the kernels alone put into the ratio range (bf16 on CUDA: a different batch size, near-tied
    # top-1 routing), not the loss.
    out["token_ratio_min_first"] = per_update[0]["token_ratio_min"]
    out["token_ratio_max_first"] = per_update[0]["token_ratio_max"]
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _summary(r: dict) -> str:
    val = f" val_acc {r['val_accuracy']:.3f}" if "val_accuracy" in r else ""
    return (
        f"{r['algo']} step {r['step']}: reward {r['train_reward']:.3f} ratio [{r['token_ratio_min']:.3f}, "
        f"{r['token_ratio_max']:.3f}] kl {r['kl_ref']:.4f} entropy {r['entropy']:.3f} grad {r['grad_norm']:.3f}"
        f"{val} ({r['step_time_s']:.1f} s)"
    )
