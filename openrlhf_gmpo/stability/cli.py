"""`openrlhf-gmpo stability`: does a policy loss keep MoE RL stable? GMPO vs GRPO on CountDown on one machine."""

import argparse
import dataclasses
from pathlib import Path

from openrlhf_gmpo.stability.config import DECODE_CACHES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stability",
        help="GMPO vs GRPO stability run on CountDown with a small Qwen3-MoE: metrics, plots, pass/fail verdict",
        description=__doc__,
    )
    parser.add_argument("--preset", required=True, help="tiny, 200m, or a path to a preset YAML file")
    parser.add_argument("--algos", default=None, help="comma-separated algorithm names from the preset (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="total RL steps per algorithm (default: the preset's)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: runs/stability-<preset>)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="warm-start cache (default: <out>/cache)")
    parser.add_argument("--engine", default="hf", choices=["hf", "megatron"], help="training/generation backend")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--decode-cache",
        default=None,
        choices=DECODE_CACHES,
        help="override the preset's rl.decode_cache (static: fixed KV cache, decode step compiled on CUDA)",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="after the shared warm start, train each algorithm in its own process on the same device "
        "(the 200m model leaves an H100 mostly idle); logs in <out>/logs/",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    seeds.add_argument(
        "--seeds",
        default=None,
        help="run once per seed (e.g. 1-3 or 1,4,7), each in <out>/seed-N/; <out>/seeds.md counts passes per algorithm",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no training: verdict, report and plots from the step records the run in --out has written so far "
        "(a stopped or still running run)",
    )
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # a --parallel child process
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="fresh", action="store_false", help="continue from checkpoints (default)")
    resume.add_argument(
        "--fresh", dest="fresh", action="store_true", help="delete this run's checkpoints and outputs first"
    )
    parser.set_defaults(func=main, fresh=False)


def main(args: argparse.Namespace) -> int:
    from openrlhf_gmpo.stability.parallel import run_parallel
    from openrlhf_gmpo.stability.runner import report_only, run_stability
    from openrlhf_gmpo.stability.seeds import parse_seeds, run_seeds

    cfg = _config(args)
    try:
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    opts = _options(args, cfg)

    def run_one(cfg, opts) -> dict:
        if args.report_only:
            return report_only(cfg, opts)
        return run_parallel(cfg, opts, args.preset) if args.parallel and not args.part else run_stability(cfg, opts)

    verdicts_by_seed = {None: run_one(cfg, opts)} if seeds is None else run_seeds(cfg, opts, seeds, run_one)
    if args.part:
        return 0
    for seed, verdicts in verdicts_by_seed.items():
        for algo, verdict in verdicts.items():
            failed = [name for name, check in verdict["checks"].items() if not check["passed"]]
            where = "" if seed is None else f"seed {seed}: "
            print(f"{where}{algo}: {'PASS' if verdict['passed'] else 'FAIL (' + ', '.join(failed) + ')'}")
    return 0


def _config(args: argparse.Namespace):
    """The preset, with the command line's overrides (--seed, --decode-cache) applied."""
    from openrlhf_gmpo.stability.config import load_preset

    try:
        cfg = load_preset(args.preset)
    except ValueError as err:
        raise SystemExit(f"--preset {args.preset}: {err}") from None
    if args.seed is not None:
        if args.seed < 0:
            raise SystemExit(f"--seed must be >= 0, got {args.seed}")
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.decode_cache is not None:
        cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, decode_cache=args.decode_cache))
    return cfg


def _options(args: argparse.Namespace, cfg):
    from openrlhf_gmpo.stability.runner import RunOptions

    algos = tuple(a.strip() for a in args.algos.split(",") if a.strip()) if args.algos else tuple(cfg.algos)
    if not algos:
        raise SystemExit(f"--algos {args.algos!r}: name at least one algorithm")
    if len(set(algos)) != len(algos):
        repeated = sorted({a for a in algos if algos.count(a) > 1})
        raise SystemExit(f"--algos {args.algos!r}: {', '.join(repeated)} named more than once")
    steps = cfg.rl.steps if args.steps is None else args.steps
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    if args.part and len(algos) != 1:
        given = f"--algos {args.algos!r}" if args.algos else f"the preset's {', '.join(algos)}"
        raise SystemExit(f"--part trains exactly one algorithm, got {given}")
    out_dir = args.out or Path("runs") / f"stability-{cfg.name}"
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())  # the cwd, at least
    if not existing.is_dir():
        raise SystemExit(f"--out {out_dir}: {existing} exists and is not a directory")
    return RunOptions(
        algos=algos,
        steps=steps,
        out_dir=out_dir,
        cache_dir=args.cache_dir or out_dir / "cache",
        engine=args.engine,
        device=args.device,
        fresh=args.fresh,
        part=args.part,
    )
