#!/usr/bin/env bash
# The GPU-box work of docs/gpu-runs.md as named phases, run in the order given:
#   tools/gpu_session.sh setup step-bench stability-start gpu-tests stability-wait
#   tools/gpu_session.sh stability-wait            # a later call: waits (until DEADLINE_S) and collects when done
#   tools/gpu_session.sh kernel-bench
# Results land in $OUT (the device tool's output folder; default runs/gpu-out). The 200m stability run goes on in
# the background (setsid) between calls, so it survives the end of the command that started it.
# Dry run on a CPU machine: PYTHON=.venv/bin/python DEVICE=cpu PRESET=tiny STEPS=3 SMALL=1 tools/gpu_session.sh ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-200m}
STEPS=${STEPS:-300}
RUN=${RUN:-runs/stability-$PRESET}
# stability-wait returns once this script has run this long (bash's SECONDS), so a 600 s device command ends in time
# whatever ran before it
DEADLINE_S=${DEADLINE_S:-560}
SMALL=${SMALL:-0}       # 1: kernel benches at their small CPU sizes (dry run)
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }

setup() {
  # Wheels the box lacks (megatron-core, OpenRLHF and what importing its loss module needs) from .whl/, filled by
  # tools/fetch_gpu_wheels.sh. SITE: where they go (a CPU dry run points it elsewhere).
  local site=${SITE:-/tmp/site}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl ||
      return 1
    export PYTHONPATH=$site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  {
    date -u '+%Y-%m-%d %H:%M UTC'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch, transformers, megatron.core as m
print("torch", torch.__version__, "transformers", transformers.__version__, "megatron-core", m.__version__)'
  } | tee "$OUT/device.txt"
}

step_bench() {
  for cache in static dynamic; do
    "$PYTHON" bench/bench_stability_step.py --preset "$PRESET" --device "$DEVICE" --steps 5 --decode-cache "$cache" \
      --json "$OUT/step-$cache.json" || say "step-bench with a $cache cache failed"
  done
}

running() { [[ -f $RUN/driver.pid ]] && kill -0 "$(cat "$RUN/driver.pid")" 2>/dev/null; }

stability_start() {
  if running; then
    say "stability run already going (pid $(cat "$RUN/driver.pid"))"
    return 0
  fi
  mkdir -p "$RUN"
  local cache=${DECODE_CACHE:-$(faster_decode_cache)} extra=()
  [[ -n $cache ]] && extra=(--decode-cache "$cache")
  # --parallel: GMPO and GRPO in two processes on the one GPU, after the shared warm start.
  setsid nohup "$PYTHON" -m openrlhf_gmpo stability --preset "$PRESET" --out "$RUN" --steps "$STEPS" \
    --device "$DEVICE" --parallel "${extra[@]}" >"$RUN/driver.log" 2>&1 </dev/null &
  echo $! >"$RUN/driver.pid"
  say "stability run started (pid $!, KV cache: ${cache:-as in the preset}): $RUN/driver.log"
}

faster_decode_cache() {
  # The cache whose step-bench median step was faster; nothing (the preset's choice) if step-bench did not run.
  "$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys

times = {}
for cache in ("static", "dynamic"):
    path = pathlib.Path(sys.argv[1]) / f"step-{cache}.json"
    if path.is_file():
        times[cache] = json.loads(path.read_text())["seconds"]["step_time_s"]["median"]
print(min(times, key=times.get) if times else "")
PY
}

progress() {
  tail -n 2 "$RUN/driver.log" 2>/dev/null
  for log in "$RUN"/logs/*.log; do
    [[ -f $log ]] && echo "$(basename "$log"): $(grep -E ' step [0-9]+:' "$log" | tail -n 1)"
  done
}

stability_wait() {
  while running && ((SECONDS + 30 < DEADLINE_S)); do
    sleep 30
    progress
  done
  if running; then
    say "still running (this command has run ${SECONDS}s): call stability-wait again"
    progress
    return 0
  fi
  say "stability run finished"
  tail -n 5 "$RUN/driver.log"
  collect
}

collect() {
  local files=()
  for name in report.md verdict.json metrics.jsonl ratio_range.png training_curves.png run.json driver.log logs; do
    [[ -e $RUN/$name ]] && files+=("$name")
  done
  tar czf "$OUT/stability-$PRESET.tgz" -C "$RUN" "${files[@]}" && say "collected ${files[*]} into $OUT/stability-$PRESET.tgz"
}

gpu_tests() {
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_losses_gpu.py tests/test_grouped_experts.py \
    tests/test_megatron_gpu.py tests/test_stability_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
}

kernel_bench() {
  if ((SMALL)); then
    "$PYTHON" bench/bench_losses.py --device "$DEVICE" --batch 8 --length 64 --repeats 2 --warmup 1 --json "$OUT/losses.json"
    "$PYTHON" bench/bench_moe_layer.py --device "$DEVICE" --small --json "$OUT/moe_layer.json"
    "$PYTHON" bench/bench_moe_model.py --device "$DEVICE" --small --json "$OUT/moe_model.json"
    "$PYTHON" bench/profile_moe_layer.py --device "$DEVICE" --small --dtype fp32 --json "$OUT/profile_moe_layer.json"
  else
    "$PYTHON" bench/bench_losses.py --device "$DEVICE" --batch 512 --length 8192 --repeats 20 --warmup 5 \
      --json "$OUT/losses.json"
    "$PYTHON" bench/bench_moe_layer.py --json "$OUT/moe_layer.json"
    "$PYTHON" bench/bench_moe_model.py --json "$OUT/moe_model.json"
    "$PYTHON" bench/profile_moe_layer.py --json "$OUT/profile_moe_layer.json"
  fi
}

status=0
for phase in "$@"; do
  say "phase $phase"
  case $phase in
  setup) setup || { say "setup failed"; exit 1; } ;;
  step-bench) step_bench ;;
  stability-start) stability_start ;;
  stability-wait) stability_wait ;;
  collect) collect ;;
  gpu-tests) gpu_tests || status=1 ;;
  kernel-bench) kernel_bench || status=1 ;;
  *)
    echo "gpu_session.sh: unknown phase '$phase' (setup step-bench stability-start stability-wait collect gpu-tests kernel-bench)" >&2
    exit 2
    ;;
  esac
done
exit $status
