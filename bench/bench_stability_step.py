"""Time one RL step of `openrlhf-gmpo stability`, split into generation / log-prob scoring / mini-batch updates.

    python bench/bench_stability_step.py --preset tiny --device cpu --steps 3
    python bench/bench_stability_step.py --preset 200m --device cuda --steps 5          # the GPU goal: <= 2 s per step
    python bench/bench_stability_step.py --preset 200m --device cuda --decode-cache dynamic   # without CUDA graphs

Runs the stability loop's own `rl_step` (HF engine, the preset's rollout batch, mini-batch size and max new tokens)
on randomly initialised weights: a random model rarely emits EOS, so every response runs to max_new_tokens, the worst
case for generation. The first --warmup steps are not timed (with a static cache they include the decode step's
compilation, reported as warmup_s). Every phase ends in a host read of its results, so the
GPU work is finished when its clock stops. Prints a table and writes JSON, also when stopped early (SIGTERM: the steps
timed so far; common.run_and_report).
"""

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import run_and_report

from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import DECODE_CACHES, load_preset
from openrlhf_gmpo.stability.data import split_tasks
from openrlhf_gmpo.stability.engine import make_engine
from openrlhf_gmpo.stability.rl_loop import rl_step
from openrlhf_gmpo.stability.runner import resolve_device

PHASES = ("generate_s", "score_s", "update_s", "step_time_s")


def run(cfg, device: str, args, result: dict) -> None:
    rl = cfg.rl
    result.update(
        preset=cfg.name,
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        host=platform.node(),
        cpu_threads=torch.get_num_threads(),
        date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        rollouts_per_step=rl.rollout_batch_size,
        max_new_tokens=rl.max_new_tokens,
        decode_cache=args.decode_cache,
        warmup_steps=args.warmup,
        warmup_s=0.0,
        optimizer_steps_per_rl_step=rl.epochs * rl.rollout_batch_size // rl.mini_batch_size,
        step_seconds={phase: [] for phase in PHASES},  # per timed step
        response_lengths=[],
    )
    state.set_determinism(cfg.threads, device)
    tokenizer = build_tokenizer()
    # a few hundred tasks are enough to draw prompts from; building the preset's full train split can take minutes
    data = cfg.data.__class__(**{**cfg.data.__dict__, "train_tasks": max(rl.prompts_per_step, 256), "val_tasks": 1})
    train_tasks, _ = split_tasks(data, cfg.seed)
    engine = make_engine("hf", model_size=cfg.model.size, vocab_size=len(tokenizer), seed=cfg.seed, device=device,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                         decode_cache=args.decode_cache)  # fmt: skip
    engine.freeze_reference()
    engine.reset_optimizer(rl.lr, rl.weight_decay, rl.grad_clip)
    for step in range(1, args.warmup + args.steps + 1):
        record = rl_step(engine, tokenizer, cfg, args.algo, cfg.algos[args.algo], train_tasks, step)
        if step <= args.warmup:
            result["warmup_s"] += record["step_time_s"]
        else:
            for phase in PHASES:
                result["step_seconds"][phase].append(record[phase])
            result["response_lengths"].append(record["response_length"])


def summarise(result: dict) -> None:
    """Median and min per phase over the steps timed (fewer than asked for if the run was stopped)."""
    lengths = result.get("response_lengths", [])
    result["timed_steps"] = len(lengths)
    result["mean_response_length"] = statistics.mean(lengths) if lengths else None
    result["seconds"] = {
        phase: {"median": statistics.median(values), "min": min(values)}
        for phase, values in result.get("step_seconds", {}).items()
        if values
    }


def print_table(result: dict) -> None:
    if "preset" not in result:
        return
    length = f"{result['mean_response_length']:.1f}" if result["mean_response_length"] is not None else "-"
    print(
        f"{result['preset']} on {result['device']}: {result['rollouts_per_step']} rollouts x <= "
        f"{result['max_new_tokens']} new tokens (mean {length}), {result['optimizer_steps_per_rl_step']} optimizer "
        f"steps, {result['decode_cache']} KV cache ({result['warmup_steps']} warm-up steps: {result['warmup_s']:.1f} s)"
    )
    print(f"{'phase':<14}{'median s':>10}{'min s':>10}   ({result['timed_steps']} timed steps)")
    for phase, stats in result["seconds"].items():
        print(f"{phase.removesuffix('_s'):<14}{stats['median']:>10.3f}{stats['min']:>10.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--algo", default="gmpo", help="an algorithm of the preset (the loss costs the same for all)")
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps")
    parser.add_argument("--decode-cache", choices=DECODE_CACHES, default=None, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=1, help="untimed RL steps first")
    parser.add_argument(
        "--json", type=Path, default=None, help="output (default runs/bench_stability_step-<preset>-<device>.json)"
    )
    args = parser.parse_args()

    try:
        cfg = load_preset(args.preset)
    except ValueError as error:
        raise SystemExit(f"--preset {args.preset}: {error}") from None
    args.decode_cache = args.decode_cache or cfg.rl.decode_cache
    if args.algo not in cfg.algos:
        raise SystemExit(f"--algo {args.algo!r} is not in preset {cfg.name!r} (it has {', '.join(cfg.algos)})")
    device = resolve_device(args.device)
    args.json = args.json or Path("runs") / f"bench_stability_step-{cfg.name}-{device}-{args.decode_cache}.json"
    return run_and_report(functools.partial(run, cfg, device), summarise, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
