"""`openrlhf-gmpo countdown {data,tokenizer,model,all}`: build the CountDown toy task's files offline.

openrlhf-gmpo countdown data --out data/countdown --seed 0
openrlhf-gmpo countdown model --size 200m --out ckpt/countdown-200m --seed 0   # also saves the tokenizer
openrlhf-gmpo countdown all --out runs/countdown --size tiny                   # data/ and model-tiny/ under OUT
"""

import argparse
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SFT = 10_000, 500, 10_000


def register(subparsers) -> None:
    parser = subparsers.add_parser("countdown", help="CountDown toy task: data, tokenizer, Qwen3-MoE model")
    commands = parser.add_subparsers(dest="countdown_command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="train/val RL prompts and SFT traces as jsonl")
    _add_out(data)
    _add_data_options(data)
    data.set_defaults(func=run_data)

    tokenizer = commands.add_parser("tokenizer", help="the character-level tokenizer (save_pretrained)")
    _add_out(tokenizer)
    tokenizer.set_defaults(func=run_tokenizer)

    model = commands.add_parser("model", help="a randomly initialised Qwen3-MoE checkpoint with the tokenizer")
    _add_out(model)
    _add_model_options(model, "--seed")
    model.set_defaults(func=run_model)

    everything = commands.add_parser("all", help="data/ and model-SIZE/ under --out")
    _add_out(everything)
    _add_data_options(everything)
    _add_model_options(everything, "--model-seed")  # --seed is the data seed here
    everything.set_defaults(func=run_all)


def _add_out(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _add_data_options(parser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="RL training prompts")
    parser.add_argument("--val", type=int, default=DEFAULT_VAL, help="validation prompts (and their SFT traces)")
    parser.add_argument("--sft", type=int, default=DEFAULT_SFT, help="SFT traces, on tasks disjoint from the rest")
    parser.add_argument("--min-numbers", type=int, default=3)
    parser.add_argument("--max-numbers", type=int, default=4)
    parser.add_argument("--max-value", type=int, default=99, help="numbers are drawn from 1..MAX_VALUE")
    parser.add_argument("--max-target", type=int, default=100, help="targets are drawn from 1..MAX_TARGET")


def _add_model_options(parser, seed_flag: str) -> None:
    parser.add_argument("--size", choices=["tiny", "200m"], default="tiny")
    parser.add_argument(seed_flag, dest="model_seed", type=int, default=0, help="weight initialisation seed")


# Written into every output folder: --overwrite replaces only a folder that has it (or an empty one), so a mistyped
# --out can never wipe a folder these commands did not write.
MARKER = ".openrlhf-gmpo-countdown"


@contextmanager
def _staged_out(path: Path, overwrite: bool):
    """Yield an empty folder next to `path` to write into; `path` is replaced by it only when the block succeeds,
    so a failed or interrupted run leaves an existing output as it was."""
    target, cwd = path.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise SystemExit(f"countdown: --out {path} is the current folder or one of its parents; name a new folder")
    if target.exists():
        if not overwrite:
            raise SystemExit(f"countdown: output path {path} exists; pass --overwrite to replace it")
        ours = target.is_dir() and ((target / MARKER).is_file() or not any(target.iterdir()))
        if not ours:
            raise SystemExit(
                f"countdown: --overwrite replaces only a folder these commands wrote (it holds {MARKER}); "
                f"{path} is not one, so it is left as it is: remove it yourself or choose another --out"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / MARKER).write_text("written by openrlhf-gmpo countdown; its --overwrite may replace this folder\n")
    _permissions_as_by_umask(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _permissions_as_by_umask(root: Path) -> None:
    """The permissions a plain mkdir / open give, for root and everything in it: mkdtemp makes the staging folder
    0700 and transformers saves model.safetensors 0600, which other users of a cluster's shared storage cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale_staging(target: Path) -> None:
    """Remove staging folders for `target` left by a run that was killed (SIGKILL or SIGTERM skip the cleanup above).

    Each staging folder's name holds the pid that writes it; one whose process is gone is stale. A live writer's
    folder is left alone, so two runs aimed at the same --out never delete each other's work.
    """
    for folder in target.parent.glob(f".{target.name}.partial-*"):
        pid = folder.name.removeprefix(f".{target.name}.partial-").split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            print(f"countdown: removing {folder}, left by an interrupted run (process {pid})")
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _generator_settings(args) -> dict:
    """The task generator's settings; impossible ones exit with a message before any output is touched."""
    from openrlhf_gmpo.countdown.tasks import check_settings

    settings = dict(
        min_numbers=args.min_numbers, max_numbers=args.max_numbers, max_value=args.max_value, max_target=args.max_target
    )
    for flag, n in (("--train", args.train), ("--val", args.val), ("--sft", args.sft)):
        if n < 0:
            raise SystemExit(f"countdown: {flag} must be >= 0, got {n}")
    try:
        check_settings(min_value=1, min_target=1, **settings)
    except ValueError as error:
        raise SystemExit(f"countdown: {error}") from error
    return settings


def _write_data(args, out: Path, shown: Path) -> None:
    """The data files into `out` (the staging folder), reported under `shown` (where they end up)."""
    from openrlhf_gmpo.countdown.data import write_datasets

    settings = _generator_settings(args)
    try:
        paths = write_datasets(out, args.seed, args.train, args.val, args.sft, progress=True, **settings)
    except ValueError as error:
        raise SystemExit(f"countdown data: {error}") from error
    for path in paths.values():
        print(f"wrote {shown / Path(path).relative_to(out)}")


def _write_model(args, out: Path, shown: Path) -> None:
    from openrlhf_gmpo.countdown.model import build_model, save_checkpoint
    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(
        args.size,
        len(tokenizer),
        args.model_seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    count = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, tokenizer, str(out))
    print(f"wrote {shown}: Qwen3MoeForCausalLM {args.size}, {count:,} parameters, vocab {len(tokenizer)}, bf16")


def run_data(args: argparse.Namespace) -> int:
    _generator_settings(args)
    with _staged_out(args.out, args.overwrite) as out:
        _write_data(args, out, args.out)
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from openrlhf_gmpo.countdown.tokenizer import build_tokenizer

    with _staged_out(args.out, args.overwrite) as out:
        build_tokenizer().save_pretrained(out)
    print(f"wrote {args.out}")
    return 0


def run_model(args: argparse.Namespace) -> int:
    with _staged_out(args.out, args.overwrite) as out:
        _write_model(args, out, args.out)
    return 0


def run_all(args: argparse.Namespace) -> int:
    _generator_settings(args)
    with _staged_out(args.out, args.overwrite) as out:
        _write_data(args, out / "data", args.out / "data")
        _write_model(args, out / f"model-{args.size}", args.out / f"model-{args.size}")
    return 0
