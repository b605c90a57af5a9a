"""What the benches share: timing, the device, and a report that survives a stop.

`run_and_report` is their common tail: measure, then print the table and write the JSON. tools/gpu_session.sh bounds
every bench with `timeout`, which sends SIGTERM; Python's default action ends the process at once, so a bench stopped
one case before its end would leave nothing. Here SIGTERM (and Ctrl-C) stop the measuring instead, and the rows
measured so far are printed and written, with `result["partial"]` saying why they are incomplete (None when the run
finished). An exception is reported the same way before it is raised again.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

STOPPED = 124  # exit status of a stopped run, the one `timeout` itself reports


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: str, warmup: int, iters: int) -> float:
    """Mean wall time of `step()` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0 / iters


def dense_matmul_tflops(n: int, device: str, dtype: torch.dtype, warmup_s: float, iters: int = 100) -> float:
    """The rate of an n^3 matmul over `iters` calls, after `warmup_s` seconds of the same matmuls: a short burst
    straight after idle can catch the GPU clocks still ramping up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        torch.mm(a, b)
        synchronize(device)
    return 2 * n**3 / time_ms(lambda: torch.mm(a, b), device, 0, iters) / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --device cpu --small to check the script")


def fmt(value, spec: str) -> str:
    """A table cell: '-' for a value that was not measured."""
    return "-" if value is None else format(value, spec)


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_and_report(run_fn, summarise_fn, print_fn, args) -> int:
    """run_fn(args, result) fills `result` as it measures (each row appended once measured); summarise_fn(result)
    derives what needs all rows (ratios, goals) from the rows there are; print_fn(result) prints the table. The JSON
    goes to args.json unless that is None, naming the script that wrote it (bench/show.py prints it again)."""
    result: dict = {"bench": Path(sys.argv[0]).stem, "partial": None}
    previous = signal.signal(signal.SIGTERM, _stop)
    error = None
    try:
        run_fn(args, result)
    except KeyboardInterrupt as stop:
        why = stop.args[0] if stop.args else "SIGINT"
        result["partial"] = f"stopped by {why} before the end: only the rows measured so far"
    except Exception as exc:  # keep what was measured before the failure, then fail as before
        result["partial"] = f"failed with {exc!r}: only the rows measured before it"
        error = exc
    # Reporting takes a moment; a second TERM must not cut it (timeout's KILL, 10 s later, still ends the process).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        summarise_fn(result)
        path = Path(args.json) if getattr(args, "json", None) is not None else None
        if path is not None:  # written before printing, so a table that cannot be printed still leaves its numbers
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
        if result["partial"]:
            print(f"PARTIAL RESULT: {result['partial']}")
        print_fn(result)
        if path is not None:
            print(f"wrote {path}" + (" (partial)" if result["partial"] else ""))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if error is not None:
        raise error
    return STOPPED if result["partial"] else 0
