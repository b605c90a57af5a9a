"""Time per response of the CountDown scorer, by response length, on the seeded adversarial fuzz mix.

    OMP_NUM_THREADS=1 python bench/bench_scorer.py --n 100000 --json /tmp/bench_scorer.json

The workload is the fuzz test's generator (tests/helpers_countdown.py: near-miss answers, tag/operator/code soups,
4 kB texts with huge literals and deep nesting) plus the SFT worked solutions. Every response is scored once, after
one untimed warm-up pass, and timed alone with perf_counter_ns; the table gives p50/p99/max per length bin.
Goal: p99 <= 1 ms per response up to 4 kB. Stopped early (SIGTERM, Ctrl-C), it reports the responses timed so far.
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fuzz generator is a test helper

import helpers_countdown  # noqa: E402
from common import run_and_report  # noqa: E402

from openrlhf_gmpo.countdown.scorer import score  # noqa: E402

BINS = ((0, 256), (256, 1024), (1024, 2048), (2048, 4097))
GOAL_P99_MS = 1.0


def percentile(sorted_values, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(args, result: dict) -> None:
    cases = list(helpers_countdown.adversarial_responses(args.n, args.seed))
    cases += [(response, task.numbers, task.target) for task, _, response in helpers_countdown.sample_texts()]
    for case in cases:  # warm-up: caches, branch predictors, allocator
        score(*case)
    result.update(goal_p99_ms=GOAL_P99_MS, n=args.n, seed=args.seed)
    result["ms_by_chars"] = {f"{low}-{high - 1}": [] for low, high in BINS}
    for response, numbers, target in cases:
        start = time.perf_counter_ns()
        score(response, numbers, target)
        elapsed_ms = (time.perf_counter_ns() - start) / 1e6
        low, high = next(b for b in BINS if b[0] <= len(response) < b[1])
        result["ms_by_chars"][f"{low}-{high - 1}"].append(elapsed_ms)


def summarise(result: dict) -> None:
    by_bin = result.pop("ms_by_chars", {})  # 100k timings: the JSON keeps the percentiles only
    by_bin["all"] = [t for times in by_bin.values() for t in times]
    result["rows"] = []
    for chars, times in by_bin.items():
        if times:
            times.sort()
            p50, p99 = statistics.median(times), percentile(times, 0.99)
            result["rows"].append(dict(chars=chars, responses=len(times), p50_ms=p50, p99_ms=p99, max_ms=times[-1]))


def print_table(result: dict) -> None:
    if not result["rows"]:
        return
    cpu = platform.processor() or platform.machine()
    print(f"CountDown scorer, {result['rows'][-1]['responses']} responses, {cpu}")
    print("| response chars | responses | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(
            f"| {row['chars']} | {row['responses']} | {row['p50_ms']:.4f} | {row['p99_ms']:.4f} | {row['max_ms']:.3f} |"
        )
    p99 = result["rows"][-1]["p99_ms"]
    print(f"goal p99 <= {GOAL_P99_MS} ms: {'met' if p99 <= GOAL_P99_MS else 'NOT met'} (p99 {p99:.4f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="adversarial responses (plus 300 SFT traces)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    return run_and_report(run, summarise, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
