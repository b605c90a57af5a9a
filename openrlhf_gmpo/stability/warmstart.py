"""SFT warm start on worked CountDown solutions, cached by (preset, seed, settings).

RL from a random model learns nothing (every reward is 0, every advantage 0), so each run first teaches the model the
answer format and some arithmetic; all algorithms then start from these same weights.
"""

import random
import time
from pathlib import Path

from openrlhf_gmpo.countdown.tasks import CountdownTask
from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import StabilityConfig
from openrlhf_gmpo.stability.data import evaluate, sft_batch, sft_examples
from openrlhf_gmpo.stability.engine import PolicyEngine
from openrlhf_gmpo.stability.rl_math import masked_mean


def cache_path(cfg: StabilityConfig, cache_dir: Path, engine_name: str, device_type: str) -> Path:
    key = state.config_fingerprint(
        cfg.model, cfg.data, cfg.sft, cfg.rl.eval_tasks, cfg.rl.max_new_tokens, engine_name, device_type
    )
    return cache_dir / f"warmstart-{cfg.name}-seed{cfg.seed}-{key}.pt"


def warm_start(
    engine: PolicyEngine,
    tokenizer,
    cfg: StabilityConfig,
    train_tasks: list[CountdownTask],
    eval_tasks: list[CountdownTask],
    path: Path,
    log=print,
) -> dict[str, float]:
    """Load the cached warm-start weights into the engine, or train and cache them; returns its validation metrics."""
    if path.is_file():
        cached = state.load(path)
        engine.load_model_state(cached["model"])
        log(f"warm start: reusing {path} (val accuracy {cached['metrics']['val_accuracy']:.3f})")
        return cached["metrics"]

    sft = cfg.sft
    engine.reset_optimizer(sft.lr, weight_decay=0.0, grad_clip=1.0)
    rng = random.Random(state.derive_seed(cfg.seed, "sft"))
    device = getattr(engine, "device", "cpu")
    started = time.perf_counter()
    examples = sft_examples(tokenizer, train_tasks)
    log(f"warm start: {len(examples)} worked solutions in {time.perf_counter() - started:.0f} s")
    for step in range(1, sft.steps + 1):
        # linear decay to zero: a tiny model trained from scratch ends markedly more accurate than at a constant lr
        engine.set_lr(sft.lr * (1 - (step - 1) / sft.steps))
        # the same draws as sampling the tasks themselves (rng.sample picks indices), so warm starts are unchanged
        batch = sft_batch(tokenizer.pad_token_id, rng.sample(examples, min(sft.batch_size, len(examples))), device)

        def nll(log_probs, mask=batch.action_mask):
            loss = -masked_mean(log_probs, mask)
            return loss, {}

        _, metrics = engine.train_step(batch, nll)
        if step % max(sft.steps // 10, 1) == 0:
            log(f"warm start: step {step}/{sft.steps} nll {metrics['loss']:.4f}")
    metrics = evaluate(engine, tokenizer, eval_tasks, cfg.rl.max_new_tokens)
    metrics["sft_steps"] = sft.steps
    metrics["sft_seconds"] = time.perf_counter() - started
    state.atomic_save({"model": engine.model_state(), "metrics": metrics}, path)
    log(
        f"warm start: {sft.steps} steps in {metrics['sft_seconds']:.0f} s, val accuracy {metrics['val_accuracy']:.3f} "
        f"(preset expects >= {sft.min_val_accuracy}), val reward {metrics['val_reward']:.3f}"
    )
    return metrics
