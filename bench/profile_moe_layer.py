"""Where the time of megatron's MoE layer with our GroupedExperts goes: its fwd+bwd kernels, grouped by what they do.

    python bench/profile_moe_layer.py                         # one H100, the Qwen3-30B-A3B-shaped layer
    python bench/profile_moe_layer.py --device cpu --small    # checks that it runs (CPU ops instead of kernels)

bench_moe_layer.py says how fast the layer is; this says why. It profiles --iters fwd+bwd steps (after warm-up) with
torch.profiler and sums device time per kernel (per aten op on CPU). Each kernel is put in the first category whose
pattern its name matches (case-insensitive), so the split is by kernel name, stated in PATTERNS; "other" is the rest.
Prints the category table and the top kernels, and writes JSON.
"""

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer as layer_bench  # noqa: E402  (same folder: shape, problem and layer builders)
from common import device_name, require_device, run_and_report, synchronize, time_ms  # noqa: E402

# (category, regex over the kernel / op name); first match wins. Copies between host and device (the dispatcher's
# host syncs) and memsets come first, else "copy" would file them as elementwise; grouped GEMMs before dense GEMMs.
PATTERNS = [
    ("memcpy / memset", r"^mem(cpy|set)"),
    ("expert grouped GEMM", r"grouped_mm|grouped|GroupedGemm|ptr_array|cutlass.*group"),
    ("dense GEMM (router)", r"gemm|matmul|aten::mm|aten::addmm|aten::bmm|cublas|nvjet|sm90_xmma"),
    ("sort / top-k", r"sort|topk|radix|histc|bincount|cumsum|scan"),
    ("gather / scatter / index (permutation)", r"index|gather|scatter|take|masked|nonzero|embedding"),
    ("softmax / SwiGLU / elementwise", r"softmax|silu|sigmoid|elementwise|vectorized|mul|add|sub|div|exp|copy|fill"),
    ("reduction", r"reduce|sum|norm"),
]


def category(name: str) -> str:
    for label, pattern in PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def kernel_times(prof, device: str) -> dict[str, tuple[float, int]]:
    """name -> (total ms, calls): device kernels on CUDA, leaf aten ops (self CPU time) on CPU."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            ms = event.device_time_total / 1000.0
        else:
            if not event.key.startswith("aten::"):
                continue
            ms = event.self_cpu_time_total / 1000.0
        if ms > 0:
            totals[event.key][0] += ms
            totals[event.key][1] += event.count
    return {name: (ms, int(calls)) for name, (ms, calls) in totals.items()}


def run(args, result: dict) -> None:
    shape = layer_bench.SMALL if args.small else layer_bench.FULL
    device, dtype = args.device, layer_bench.DTYPES[args.dtype]
    result.update(shape=shape.__dict__, device=device_name(device), device_kind=device, dtype=str(dtype))
    result.update(routing=args.routing)
    torch.manual_seed(0)
    layer_bench.init_megatron(device)
    router, fc1, fc2, tokens = layer_bench.make_problem(shape, args.routing)
    module = layer_bench.megatron_moe_layer(shape, (router, fc1, fc2), True, device, dtype)
    x = tokens.to(device, dtype).view(shape.tokens, 1, shape.hidden)
    grad = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    step = layer_bench.fwd_bwd_step(module, x, grad)
    wall_ms = time_ms(step, device, warmup=3, iters=args.iters)  # also the profiler's warm-up
    result.update(wall_ms_per_step=wall_ms, expert_tflops_of_wall=shape.expert_flop / wall_ms / 1e9)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            step()
        synchronize(device)
    per_kernel = kernel_times(prof, device)
    by_category: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_category[category(name)] += ms / args.iters
    busy = sum(by_category.values())
    top = sorted(per_kernel.items(), key=lambda item: -item[1][0])[: args.top]
    result.update(
        busy_ms_per_step=busy,
        categories=[
            dict(category=c, ms=ms, share_of_busy=ms / busy if busy else 0.0)
            for c, ms in sorted(by_category.items(), key=lambda item: -item[1])
        ],
        top_kernels=[
            dict(name=n, category=category(n), ms_per_step=ms / args.iters, calls_per_step=calls / args.iters)
            for n, (ms, calls) in top
        ],
        patterns=PATTERNS,
    )


def print_report(result: dict) -> None:
    if "wall_ms_per_step" not in result:
        return  # stopped before the layer was timed
    unit = "kernel" if result["device_kind"] == "cuda" else "aten op (self CPU)"
    print(
        f"megatron MoELayer + GroupedExperts, {result['routing']} routing, {result['device']}: "
        f"{result['wall_ms_per_step']:.2f} ms per fwd+bwd ({result['expert_tflops_of_wall']:.0f} TFLOP/s of expert "
        f"GEMM work)" + (f"; {unit} time {result['busy_ms_per_step']:.2f} ms" if "busy_ms_per_step" in result else "")
    )
    if "categories" not in result:
        return  # stopped while profiling
    print(f"{'category':<42}{'ms/step':>10}{'share':>8}")
    for row in result["categories"]:
        print(f"{row['category']:<42}{row['ms']:>10.3f}{row['share_of_busy']:>8.1%}")
    print(f"\ntop {unit}s:")
    for row in result["top_kernels"]:
        print(f"{row['ms_per_step']:>9.3f} ms {row['calls_per_step']:>6.1f}x  [{row['category']}] {row['name'][:90]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shape (hidden 64, 8 experts) to check on CPU")
    parser.add_argument("--dtype", default="bf16", choices=sorted(layer_bench.DTYPES))
    parser.add_argument("--routing", default="even", choices=["even", "uneven"])
    parser.add_argument("--iters", type=int, default=10, help="profiled fwd+bwd steps")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--json", default="profile_moe_layer.json", help="where to write the results")
    args = parser.parse_args(argv)
    require_device(args.device)
    return run_and_report(run, lambda result: None, print_report, args)


if __name__ == "__main__":
    raise SystemExit(main())
