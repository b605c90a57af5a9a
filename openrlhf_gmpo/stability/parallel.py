"""`--parallel`: one process per algorithm on the same device, after the shared warm start.

The 200m model's RL step leaves the GPU partly idle (small per-token decode kernels, host-side work), so two processes
on one GPU overlap each other's gaps. Each child trains and checkpoints
exactly as a sequential run does (same seeds, same checkpoint files), so a sequential command can resume a parallel
run and vice versa; the parent then writes the combined outputs from the step records in the checkpoints, without
building a model again.
"""

import gc
import subprocess
import sys
import time

import torch

from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import StabilityConfig
from openrlhf_gmpo.stability.report import json_line
from openrlhf_gmpo.stability.runner import RunOptions, checkpoint_path, prepare, write_results, write_run_json


def child_command(preset: str, cfg: StabilityConfig, opts: RunOptions, algo: str, device: str) -> list[str]:
    return [
        sys.executable, "-m", "openrlhf_gmpo", "stability", "--preset", preset, "--algos", algo,
        "--steps", str(opts.steps), "--out", str(opts.out_dir), "--cache-dir", str(opts.cache_dir),
        "--engine", opts.engine, "--device", device, "--decode-cache", cfg.rl.decode_cache, "--seed", str(cfg.seed),
        "--part",
    ]  # fmt: skip


def run_parallel(cfg: StabilityConfig, opts: RunOptions, preset: str, log=print) -> dict:
    """Warm start here, train each algorithm in a child process, then write the outputs; returns the verdicts."""
    started = time.perf_counter()
    ready = prepare(cfg, opts, log=log)  # data and warm start land in the cache the children read
    device, warm = ready.device, ready.warm
    del ready
    write_run_json(cfg, opts, device)  # now, not at the end: a stopped run's --report-only reads it
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the children need the memory; this process only waits from here on

    logs = opts.out_dir / "logs"
    logs.mkdir(exist_ok=True)
    children = {}
    try:
        for algo in opts.algos:
            path = logs / f"{algo}.log"
            with path.open("w") as out:
                process = subprocess.Popen(
                    child_command(preset, cfg, opts, algo, device), stdout=out, stderr=subprocess.STDOUT
                )
            children[algo] = (process, path)
            log(f"{algo}: training in process {process.pid}; progress in {path}")
        failed, running = [], dict(children)
        while running:  # each exit is logged when it happens: a crashed child must not wait for the other to finish
            time.sleep(0.2)
            for algo, (process, path) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[algo]
                log(f"{algo}: {'done' if code == 0 else f'exited with code {code} (see {path})'}")
                if code != 0:
                    failed.append(f"{algo} exited with code {code} (see {path})")
    finally:
        for process, _ in children.values():
            if process.poll() is None:  # we were interrupted: do not leave orphans training on the GPU
                process.terminate()
    if failed:
        raise SystemExit(f"--parallel: {'; '.join(failed)}; rerun the same command to resume from the checkpoints")
    records_by_algo = {algo: state.load(checkpoint_path(opts, algo))["records"] for algo in opts.algos}
    lines = [json_line(record) + "\n" for records in records_by_algo.values() for record in records]
    (opts.out_dir / "metrics.jsonl").write_text("".join(lines))
    for algo in opts.algos:
        (opts.out_dir / f"metrics-{algo}.jsonl").unlink(missing_ok=True)  # merged into metrics.jsonl
    return write_results(cfg, opts, records_by_algo, warm, device, started, log=log)
