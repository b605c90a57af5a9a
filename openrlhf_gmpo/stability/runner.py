"""`openrlhf-gmpo stability` end to end: data, warm start, RL per algorithm, outputs."""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import StabilityConfig
from openrlhf_gmpo.stability.report import json_line, read_records, write_json, write_outputs
from openrlhf_gmpo.stability.verdict import judge


@dataclass(frozen=True)
class RunOptions:
    algos: tuple[str, ...]
    steps: int  # total RL steps per algorithm; a resumed run continues up to this many
    out_dir: Path
    cache_dir: Path
    engine: str = "hf"
    device: str = "auto"
    fresh: bool = False
    # One process of a --parallel run: trains its single algorithm into the shared checkpoints directory, logs to
    # metrics-<algo>.jsonl, and leaves run.json, metrics.jsonl and the report to the parent.
    part: bool = False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"unknown --device {device!r}: choose auto, cpu or cuda")
    return device


# What --fresh deletes (besides the metrics-<algo>.jsonl of --parallel children); the cache is kept.
OUTPUTS = (
    "checkpoints",
    "logs",
    "metrics.jsonl",
    "verdict.json",
    "report.md",
    "ratio_range.png",
    "training_curves.png",
    "warm_start.json",
)


@dataclass
class Prepared:
    """What every algorithm's run starts from: tokenizer, task splits, the engine holding the warm-start weights."""

    tokenizer: object
    train_tasks: list
    eval_tasks: list
    engine: object
    warm: dict  # the warm start's validation metrics
    device: str


def prepare(cfg: StabilityConfig, opts: RunOptions, log=print) -> Prepared:
    """Clear outputs if --fresh, then build (or load from the cache) the data and the warm start."""
    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
    from openrlhf_gmpo.stability.data import cached_split_tasks
    from openrlhf_gmpo.stability.engine import make_engine
    from openrlhf_gmpo.stability.warmstart import cache_path, warm_start

    unknown = [a for a in opts.algos if a not in cfg.algos]
    if unknown:
        raise SystemExit(f"--algos: {unknown[0]!r} is not in preset {cfg.name!r} (it has {', '.join(cfg.algos)})")
    if not opts.fresh:  # a checkpoint that cannot be resumed is refused now, not after the warm start
        from openrlhf_gmpo.stability.rl_loop import resumable_checkpoint

        for algo in opts.algos:
            resumable_checkpoint(cfg, algo, checkpoint_path(opts, algo), opts.steps, mmap=True)
    device = resolve_device(opts.device)
    log(f"preset {cfg.name} ({cfg.model.size} model) on {device}, engine {opts.engine}, output {opts.out_dir}")
    if device == "cpu" and cfg.model.size != "tiny":
        log(f"WARNING: the {cfg.model.size} model is sized for one GPU; on CPU expect hours")
    state.set_determinism(cfg.threads, device)
    out_dir = opts.out_dir
    if opts.fresh and out_dir.exists():
        for path in [out_dir / name for name in OUTPUTS] + sorted(out_dir.glob("metrics-*.jsonl")):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    engine = make_engine(
        opts.engine,
        model_size=cfg.model.size,
        vocab_size=len(tokenizer),
        seed=cfg.seed,
        device=device,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        decode_cache=cfg.rl.decode_cache,
    )  # before the data: an engine that cannot run here is refused before minutes of drawing tasks
    train_tasks, val_tasks = cached_split_tasks(cfg.data, cfg.seed, opts.cache_dir)
    eval_tasks = val_tasks[: cfg.rl.eval_tasks]
    warm = warm_start(
        engine, tokenizer, cfg, train_tasks, eval_tasks, cache_path(cfg, opts.cache_dir, opts.engine, device), log=log
    )
    write_json(warm, out_dir / "warm_start.json")  # what --report-only needs of the warm start
    if warm["val_accuracy"] < cfg.sft.min_val_accuracy:
        # Not fatal (the run still shows how the losses behave), but groups without a correct sample have zero
        # advantage, so RL from here says little; the report repeats this.
        log(
            f"WARNING: warm-start val accuracy {warm['val_accuracy']:.3f} is below sft.min_val_accuracy "
            f"{cfg.sft.min_val_accuracy}: RL will see few rewarded samples; raise sft.steps or sft.lr"
        )
    return Prepared(tokenizer, train_tasks, eval_tasks, engine, warm, device)


def run_stability(
    cfg: StabilityConfig,
    opts: RunOptions,
    on_step_end: Callable[[str, int], None] | None = None,
    log=print,
    started: float | None = None,
) -> dict:
    """Run (or resume) every algorithm in opts.algos and write all outputs; returns the verdicts by algorithm.

    `started` is the perf_counter reading the report's wall time counts from (default: now).
    """
    from openrlhf_gmpo.stability.rl_loop import run_algo

    started = time.perf_counter() if started is None else started
    ready = prepare(cfg, opts, log=log)
    engine, warm, device, out_dir = ready.engine, ready.warm, ready.device, opts.out_dir
    start_weights = engine.model_state()
    if opts.part:
        metrics_path = out_dir / f"metrics-{opts.algos[0]}.jsonl"
    else:
        write_run_json(cfg, opts, device)
        metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")  # rebuilt from the checkpoints' records, then appended step by step

    def emit(record: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json_line(record) + "\n")

    records_by_algo = {}
    for algo in opts.algos:
        records_by_algo[algo] = run_algo(
            engine,
            ready.tokenizer,
            cfg,
            algo,
            ready.train_tasks,
            ready.eval_tasks,
            start_weights,
            checkpoint_path(opts, algo),
            opts.steps,
            emit,
            on_step_end=on_step_end,
            log=log,
        )
    if opts.part:
        return {}
    return write_results(cfg, opts, records_by_algo, warm, device, started, log=log)


def checkpoint_path(opts: RunOptions, algo: str) -> Path:
    return opts.out_dir / "checkpoints" / f"{algo}.pt"


def write_run_json(cfg: StabilityConfig, opts: RunOptions, device: str) -> None:
    record = {"config": cfg.to_dict(), "algos": list(opts.algos), "steps": opts.steps, "device": device}
    write_json(record, opts.out_dir / "run.json")


def report_only(cfg: StabilityConfig, opts: RunOptions, log=print) -> dict:
    """Verdicts, report.md and plots from the step records a run has written so far, without training: for a run
    that was stopped (e.g. at the end of a GPU session) or is still going. Returns the verdicts by algorithm."""
    started, out_dir = time.perf_counter(), opts.out_dir
    warm_path = out_dir / "warm_start.json"
    if not warm_path.is_file():
        raise SystemExit(f"--report-only: {warm_path} is missing; the run in {out_dir} has not finished its warm start")
    warm = json.loads(warm_path.read_text())
    merged = read_records(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []
    records_by_algo = {}
    for algo in opts.algos:
        own = out_dir / f"metrics-{algo}.jsonl"  # a --parallel child's; merged into metrics.jsonl only at the end
        records = read_records(own) if own.is_file() else [r for r in merged if r["algo"] == algo]
        if not records:
            raise SystemExit(f"--report-only: no step records of {algo} in {out_dir}")
        records_by_algo[algo] = records
    done = {algo: len(records) for algo, records in records_by_algo.items()}
    stopped = {"steps recorded (run stopped or still going)": done} if min(done.values()) < opts.steps else {}
    device = json.loads((out_dir / "run.json").read_text())["device"] if (out_dir / "run.json").is_file() else "unknown"
    return write_results(cfg, opts, records_by_algo, warm, device, started, log=log, extra_header=stopped)


def write_results(
    cfg: StabilityConfig,
    opts: RunOptions,
    records_by_algo: dict,
    warm: dict,
    device: str,
    started: float,
    log=print,
    extra_header: dict | None = None,
) -> dict:
    """Verdicts, report.md and plots from every algorithm's step records; returns the verdicts by algorithm."""
    out_dir = opts.out_dir
    verdicts = {algo: judge(recs, warm["val_accuracy"], cfg.verdict) for algo, recs in records_by_algo.items()}
    header = {
        "preset": cfg.name,
        "date (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device,
        "engine": opts.engine,
        "model": cfg.model.size,
        "RL steps per algorithm": opts.steps,
        "rollouts per step": cfg.rl.rollout_batch_size,
        "optimizer steps per RL step": cfg.rl.epochs * cfg.rl.rollout_batch_size // cfg.rl.mini_batch_size,
        "warm-start val accuracy": warm["val_accuracy"],
        "warm-start val reward": warm["val_reward"],
        "warm-start accuracy expected (preset)": cfg.sft.min_val_accuracy,
        "warm start reached the expected accuracy": warm["val_accuracy"] >= cfg.sft.min_val_accuracy,
        "wall time of this command (s)": time.perf_counter() - started,
        **(extra_header or {}),
    }
    write_outputs(out_dir, records_by_algo, verdicts, header, cfg)
    log(f"wrote report.md, verdict.json, ratio_range.png, training_curves.png in {out_dir}")
    return verdicts
