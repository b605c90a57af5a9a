"""Forward+backward time and peak memory of every policy loss vs OpenRLHF's own PolicyLoss (ppo) on the same tensors.

    python bench/bench_losses.py --device cuda                                   # B=512, L=8192 (the GPU goal)
    python bench/bench_losses.py --device cpu --batch 64 --length 1024 --repeats 20

The inputs mirror what OpenRLHF's actor passes: fp32 log-probs (B, L), per-token advantages (B, L) constant over a
sequence, an int64 0/1 action mask with ragged lengths. Timing covers one loss forward plus `loss.backward()` (the
gradient of the log-probs): median and min over --repeats calls after --warmup, the cases taken in turn so that load
drift on a shared machine hits them alike. Peak memory (CUDA only) is the allocator's peak during one
forward+backward minus what was allocated before it (the inputs), i.e. the loss's own workspace.
Prints a table and writes JSON, also when stopped early (SIGTERM: the repeats done so far; common.run_and_report).
The GPU goal: gmpo <= 1.3x PolicyLoss time at B=512, L=8192.
"""

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
import types

import torch
from common import run_and_report

# One clip bound for every loss and for PolicyLoss: its value does not change the work done.
EPS = 0.2


def import_policy_loss():
    """openrlhf.models imports flash-attn, whose compiled extension is absent on CPU-only machines.

    PolicyLoss does not use it, so an empty module stands in when it is missing; returns (class, note).
    """
    note = ""
    if importlib.util.find_spec("flash_attn_2_cuda") is None:
        sys.modules["flash_attn_2_cuda"] = types.ModuleType("flash_attn_2_cuda")
        note = "flash_attn_2_cuda is not installed: registered an empty module for it (PolicyLoss does not use it)"
    from openrlhf.models.loss import PolicyLoss

    return PolicyLoss, note


def make_inputs(batch: int, length: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 3
    log_probs = old + torch.randn(batch, length, generator=g) * 0.3
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()  # OpenRLHF's action_mask is int64 0/1
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    return [t.to(device) for t in (log_probs, old, advantages, mask)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cases, device: str, warmup: int, repeats: int, times_ms: dict[str, list[float]]) -> None:
    """Appends each step's ms to times_ms[label], round-robin over the cases so that load drift on a shared machine
    hits them alike (and a stopped run has the same number of repeats, give or take one, of every case)."""
    for _ in range(warmup):
        for _, step in cases:
            step()
    for _ in range(repeats):
        for label, step in cases:
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times_ms.setdefault(label, []).append((time.perf_counter() - start) * 1e3)


def peak_extra_mib(step, device: str) -> float | None:
    """CUDA allocator peak during one step minus what was allocated before it; None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(args, result: dict) -> None:
    from openrlhf_gmpo.losses import LOSS_NAMES, compute_policy_loss

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    result.update(device=device, device_kind=args.device, threads=torch.get_num_threads(), torch=torch.__version__)
    result.update(batch=args.batch, length=args.length, repeats=args.repeats, warmup=args.warmup, times_ms={})
    PolicyLoss, result["note"] = import_policy_loss()
    log_probs, old, advantages, mask = make_inputs(args.batch, args.length, args.device)
    leaf = log_probs.clone().requires_grad_(True)

    def openrlhf_step():
        leaf.grad = None
        loss = ppo(leaf, old, advantages, action_mask=mask)[0]
        loss.backward()

    def ours(name, eps):
        def step():
            leaf.grad = None
            loss, _ = compute_policy_loss(name, leaf, old, advantages, mask, clip_eps_low=eps, clip_eps_high=eps)
            loss.backward()

        return step

    ppo = PolicyLoss(clip_eps_low=EPS, clip_eps_high=EPS)  # OpenRLHF's default policy_loss_type="ppo"
    cases = [("openrlhf PolicyLoss(ppo)", openrlhf_step)]
    cases += [(name, ours(name, EPS)) for name in LOSS_NAMES]
    measure(cases, args.device, args.warmup, args.repeats, result["times_ms"])
    result["peak_extra_mib"] = {label: peak_extra_mib(step, args.device) for label, step in cases}


def summarise(result: dict) -> None:
    """Median and min per loss over the repeats there are, and their ratios to PolicyLoss's."""
    peaks = result.get("peak_extra_mib", {})
    result["rows"] = [
        {"loss": label, "ms": statistics.median(ms), "ms_min": min(ms), "peak_extra_mib": peaks.get(label)}
        for label, ms in result.get("times_ms", {}).items()
    ]
    result["repeats_done"] = min((len(ms) for ms in result.get("times_ms", {}).values()), default=0)
    base = result["rows"][0] if result["rows"] else None  # PolicyLoss: measured first in every round
    for row in result["rows"]:  # on a shared CPU the min is the steadier of the two
        row["x_openrlhf"] = row["ms"] / base["ms"]
        row["x_openrlhf_min"] = row["ms_min"] / base["ms_min"]


def print_table(result: dict) -> None:
    if "device" not in result:
        return
    if result.get("note"):
        print(f"note: {result['note']}")
    print(f"device: {result['device']} ({result['device_kind']}, {result['threads']} threads), torch {result['torch']}")
    timing = f"median of {result['repeats_done']} (of {result['repeats']}) after {result['warmup']} warm-up"
    print(f"B={result['batch']}, L={result['length']}, fp32 log-probs, eps {EPS}, fwd+bwd, {timing}")
    print(f"{'loss':<26}{'median ms':>10}{'min ms':>10}{'x PL median':>12}{'x PL min':>10}{'peak extra MiB':>16}")
    for row in result["rows"]:
        peak = "n/a" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f}"
        print(
            f"{row['loss']:<26}{row['ms']:>10.2f}{row['ms_min']:>10.2f}{row['x_openrlhf']:>12.2f}"
            f"{row['x_openrlhf_min']:>10.2f}{peak:>16}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--json", default="runs/bench_losses.json", help="where to write the results (runs/ is git-ignored)"
    )
    args = parser.parse_args(argv)
    if args.batch < 1 or args.length < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--batch, --length, --repeats must be >= 1 and --warmup >= 0, got {vars(args)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return run_and_report(run, summarise, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
