"""A bench stopped by `timeout` (SIGTERM) or failing half-way still prints and writes the rows it measured.

tools/gpu_session.sh bounds every bench with `timeout`; the GPU session is one shot, so a table cut short must not be
lost with the rows already measured (bench/common.py's run_and_report).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_moe_layer  # noqa: E402  (scripts in bench/, not package modules)
import bench_moe_model  # noqa: E402
import common  # noqa: E402


def two_rows_then(stop):
    """A bench's run_fn: two rows measured, then `stop()` (a signal, an error or nothing) before the third."""

    def run(args, result):
        result.update(device="test", rows=[])
        for index in range(3):
            if index == 2:
                stop()
            result["rows"].append({"case": f"row {index}", "ms": 1.0 + index})

    return run


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler interrupts the sleep (the third row would be added if it did not)


def print_rows(result):
    for row in result["rows"]:
        print(f"{row['case']}: {row['ms']} ms")


def test_sigterm_reports_the_rows_measured_so_far(tmp_path, capsys):
    args = SimpleNamespace(json=tmp_path / "sub" / "bench.json")
    before = signal.getsignal(signal.SIGTERM)
    assert common.run_and_report(two_rows_then(sigterm), lambda result: None, print_rows, args) == common.STOPPED
    assert signal.getsignal(signal.SIGTERM) is before  # the default action is back once the report is written
    written = json.loads(args.json.read_text())
    assert [row["case"] for row in written["rows"]] == ["row 0", "row 1"]
    assert written["partial"].startswith("stopped by SIGTERM")
    printed = capsys.readouterr().out
    assert "PARTIAL RESULT: stopped by SIGTERM" in printed and "row 1: 2.0 ms" in printed and "(partial)" in printed


def test_an_error_reports_the_rows_then_is_raised(tmp_path):
    args = SimpleNamespace(json=tmp_path / "bench.json")

    def fail():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        common.run_and_report(two_rows_then(fail), lambda result: None, print_rows, args)
    written = json.loads(args.json.read_text())
    assert len(written["rows"]) == 2 and "CUDA out of memory" in written["partial"]


def test_a_complete_run_is_not_partial(tmp_path):
    args = SimpleNamespace(json=tmp_path / "bench.json")
    assert common.run_and_report(two_rows_then(lambda: None), lambda result: None, print_rows, args) == 0
    written = json.loads(args.json.read_text())
    assert written["partial"] is None and len(written["rows"]) == 3


def test_layer_goals_of_a_stopped_run_cover_the_measured_cases_only():
    # Stopped after the even routing's megatron rows: the goals that need "GroupedExperts alone" or the uneven
    # routing are left out rather than guessed. Dense: 400 before, 500 after -> ratios against 500.
    result = {
        "rows": [
            {"case": "dense matmul 8192^3, before", "routing": "-", "tflops": 400.0},
            {"case": "HF Qwen3MoeSparseMoeBlock grouped_mm", "routing": "even", "tflops": 150.0},
            {"case": "megatron MoELayer, SequentialMLP", "routing": "even", "tflops": 20.0},
            {"case": "megatron MoELayer, GroupedExperts", "routing": "even", "tflops": 340.0},
            {"case": "dense matmul 8192^3, after", "routing": "-", "tflops": 500.0},
        ]
    }
    bench_moe_layer.summarise(result)
    assert result["dense_tflops"] == 500.0
    assert [row["fraction_of_dense"] for row in result["rows"]] == [0.8, 0.3, 0.04, 0.68, 1.0]
    goals = {goal["goal"]: (goal["measured"], goal["met"]) for goal in result["goals"]}
    assert goals == {
        "megatron MoE layer >= 2x HF grouped_mm (even)": (pytest.approx(340 / 150), True),
        "megatron MoE layer TFLOP/s >= 330 (even)": (340.0, True),
        "megatron MoE layer >= 16x today's SequentialMLP (even)": (17.0, True),
    }


def test_model_decoder_layer_needs_both_depths():
    # megatron was stopped before its 4-layer row: no decoder-layer time for it, (40 - 10) / 3 = 10 ms for HF
    result = {
        "shape": {"batch": 4, "seq": 2048},
        "dense_tflops_measured": [600.0],
        "rows": [
            {"case": "HF experts=grouped_mm", "layers": 1, "ms": 10.0, "tflops": 300.0},
            {"case": "megatron (GroupedExperts)", "layers": 1, "ms": 8.0, "tflops": 360.0},
            {"case": "HF experts=grouped_mm", "layers": 4, "ms": 40.0, "tflops": 300.0},
        ],
    }
    bench_moe_model.summarise(result)
    assert result["decoder_layer"] == [
        {"case": "HF experts=grouped_mm", "decoder_layer_ms": 10.0, "tokens_per_s": 8192 / 10.0 * 1000.0}
    ]
    assert [row["fraction_of_dense"] for row in result["rows"]] == [0.5, 0.6, 0.5]


def test_layer_bench_script_stopped_by_timeout_writes_partial_json(tmp_path):
    # The real script on CPU: SIGTERM as soon as its first case is measured (~5 s in), as `timeout` would send it.
    out = tmp_path / "moe_layer.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "bench" / "bench_moe_layer.py"), "--device", "cpu", "--small", "--json", out]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = ""
    for line in process.stdout:
        printed += line
        if line.startswith("measured "):
            process.send_signal(signal.SIGTERM)
            break
    printed += process.communicate(timeout=60)[0]
    assert process.returncode == common.STOPPED, printed
    written = json.loads(out.read_text())
    assert written["partial"].startswith("stopped by SIGTERM")
    assert written["rows"][0]["case"].startswith("dense matmul") and len(written["rows"]) >= 2
    assert "PARTIAL RESULT" in printed

    # bench/show.py prints the same report again from the JSON alone (the device tool may cut printed tables)
    shown = subprocess.run([sys.executable, str(ROOT / "bench" / "show.py"), out], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    header, *report = shown.stdout.splitlines()
    assert header == f"== {out} (bench_moe_layer)" and len(report) > 3
    assert "\n".join(report) in printed


def test_show_refuses_json_of_no_bench(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"bench": "pytest", "partial": None}))
    shown = subprocess.run([sys.executable, str(ROOT / "bench" / "show.py"), path], capture_output=True, text=True)
    assert shown.returncode == 1 and "'bench' is 'pytest', not a script in bench/" in shown.stderr
