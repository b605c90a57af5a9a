"""tools/gpu_session.sh, the script a GPU session runs call by call (docs/gpu-runs.md), dry-run on CPU at toy sizes.

A GPU session is rare and one shot: a phase that broke since the last rehearsal would cost its share of the 30
minutes. This runs calls 1 and 3 of the plan without the GPU-only parts (`setup`'s wheels, the GPU tests' bodies):
both step benches, the stability run started in the background with the faster cache, waited for and packed, and
the four kernel benches, each of whose JSON `bench/show.py` must print. ~3 minutes on 2 cores.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "step-static.json": "bench_stability_step",
    "step-dynamic.json": "bench_stability_step",
    "moe_layer.json": "bench_moe_layer",
    "losses.json": "bench_losses",
    "profile_moe_layer.json": "profile_moe_layer",
    "moe_model.json": "bench_moe_model",
}


# The whole plan takes ~3 min here; the script's own bound (DEADLINE_S) ends it well before pytest's.
pytestmark = pytest.mark.timeout(1200)
DEADLINE_S = 900


def gpu_session(tmp_path, *phases):
    """Run the script's phases on CPU (the dry-run settings of its header); returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k not in ("DECODE_CACHE", "STOP_AT_S", "DEADLINE_S", "RUN", "OUT")}
    env.update(PYTHON=sys.executable, DEVICE="cpu", PRESET="tiny", STEPS="2", SMALL="1", DEADLINE_S=str(DEADLINE_S))
    # SITE: where `setup` installs the box's wheels when .whl/ holds them (tools/fetch_gpu_wheels.sh), not /tmp/site
    env.update(OUT=str(tmp_path / "out"), RUN=str(tmp_path / "run"), SITE=str(tmp_path / "site"))
    command = ["bash", str(ROOT / "tools" / "gpu_session.sh"), *phases]
    # Its own session, so that a timeout here stops the script and whatever bench it is running, not bash alone.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=DEADLINE_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_session")
    try:
        phases = ("setup", "step-bench", "stability-start", "stability-wait", "gpu-tests", "kernel-bench")
        yield gpu_session(tmp, *phases), tmp / "out"
    finally:
        # The stability run has a process group of its own (setsid); stop it if the script left it running.
        pid_file = tmp / "run" / "driver.pid"
        if pid_file.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_every_phase_succeeds_in_order(plan_run):
    done, _ = plan_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    phases = [line.split("phase ")[1] for line in done.stdout.splitlines() if "] phase " in line]
    assert phases == ["setup", "step-bench", "stability-start", "stability-wait", "gpu-tests", "kernel-bench"]


def test_each_bench_writes_a_whole_json_that_show_prints(plan_run):
    _, out = plan_run
    for name, bench in BENCHES.items():
        result = json.loads((out / name).read_text())
        assert result["bench"] == bench and not result["partial"], name
    assert json.loads((out / "step-static.json").read_text())["decode_cache"] == "static"
    assert len(json.loads((out / "moe_layer.json").read_text())["rows"]) > 0
    shown = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "show.py"), *(str(out / name) for name in BENCHES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("== ") == len(BENCHES) and "PARTIAL" not in shown.stdout


def test_the_stability_run_uses_the_faster_cache_and_is_packed_whole(plan_run):
    done, out = plan_run
    medians = {
        cache: json.loads((out / f"step-{cache}.json").read_text())["seconds"]["step_time_s"]["median"]
        for cache in ("static", "dynamic")
    }
    assert f"KV cache: {min(medians, key=medians.get)})" in done.stdout
    with tarfile.open(out / "stability-tiny.tgz") as archive:
        names = set(archive.getnames())
        verdict = json.load(archive.extractfile("verdict.json"))
    assert {"report.md", "verdict.json", "metrics.jsonl", "ratio_range.png", "training_curves.png"} <= names
    assert set(verdict) == {"gmpo", "grpo"}
    assert not (out / "stability-tiny-partial.tgz").exists()  # the run finished: the whole archive only


def test_gpu_tests_phase_collects_the_gpu_tests(plan_run):
    _, out = plan_run
    summary = (out / "gpu_tests.log").read_text().strip().splitlines()[-1]
    # On CPU every GPU test is skipped; none failed or failed to import (pytest's summary would count it).
    assert re.match(r"\d+ skipped", summary) and not re.search(r"\b(passed|failed|errors?)\b", summary), summary


def test_waiting_on_a_fresh_machine_says_the_run_is_gone(tmp_path):
    done = gpu_session(tmp_path, "stability-wait")
    assert done.returncode == 1
    assert "no stability run on this machine" in done.stdout
