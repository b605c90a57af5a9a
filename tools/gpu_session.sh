#!/usr/bin/env bash
# The GPU-box work of docs/gpu-runs.md as named phases, run in the order given:
#   tools/gpu_session.sh setup step-bench stability-start gpu-tests stability-wait
#   tools/gpu_session.sh setup stability-wait                  # a later call: waits, collects when done
#   STOP_AT_S=240 tools/gpu_session.sh setup stability-wait kernel-bench   # the last call: stops the run if need be
# Every phase is bounded by what is left of DEADLINE_S, so a 600 s device command always ends in time and returns its
# files; stability-wait packs what the run has so far into $OUT on every call, finished or not.
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
# stability-wait stops the run (and collects what it has) once this script has run this long; unset: never
STOP_AT_S=${STOP_AT_S:-}
SMALL=${SMALL:-0}       # 1: kernel benches at their small CPU sizes (dry run)
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }

# bounded LIMIT CMD...: run CMD for at most LIMIT seconds, or what is left before DEADLINE_S (less a 15 s margin for
# the rest of the command), whichever is less; skipped with a message when under 10 s are left. The benches catch
# timeout's SIGTERM and still print and write what they measured, marked partial (bench/common.py).
bounded() {
  local limit=$1 left=$((DEADLINE_S - SECONDS - 15))
  shift
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    say "skipped (${limit}s left before DEADLINE_S): $*"
    return 124
  fi
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && say "stopped after ${limit}s: $*"
  return $rc
}

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
  # 1 warm-up (with a static cache: the decode step's compilation) + 3 timed steps per cache; the run itself then
  # logs every step's time.
  for cache in static dynamic; do
    bounded 150 "$PYTHON" bench/bench_stability_step.py --preset "$PRESET" --device "$DEVICE" --steps 3 \
      --decode-cache "$cache" --json "$OUT/step-$cache.json" || say "step-bench with a $cache cache failed"
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
  # The cache whose step-bench median step was faster; nothing (the preset's choice) if step-bench timed no step for
  # either (a bench stopped early writes the steps it timed, possibly none).
  "$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys

times = {}
for cache in ("static", "dynamic"):
    path = pathlib.Path(sys.argv[1]) / f"step-{cache}.json"
    step = json.loads(path.read_text()).get("seconds", {}).get("step_time_s") if path.is_file() else None
    if step:
        times[cache] = step["median"]
print(min(times, key=times.get) if times else "")
PY
}

progress() {
  tail -n 2 "$RUN/driver.log" 2>/dev/null
  for log in "$RUN"/logs/*.log; do
    [[ -f $log ]] || continue
    echo "$(basename "$log"): $(grep -E ' step [0-9]+:' "$log" | tail -n 1)"
    # a child that died says so now, not when the other child finishes
    if grep -qE '^Traceback|Error|exited with code' "$log"; then
      echo "$(basename "$log") FAILED:" && tail -n 5 "$log"
    fi
  done
}

stability_wait() {
  if [[ ! -f $RUN/driver.pid ]]; then
    # A fresh machine: the one that ran stability-start was given back (and its disk with it).
    say "no stability run on this machine ($RUN/driver.pid missing): start one with stability-start"
    return 1
  fi
  local until=$DEADLINE_S
  [[ -n $STOP_AT_S ]] && ((STOP_AT_S < until)) && until=$STOP_AT_S
  while running && ((SECONDS + 30 < until)); do
    sleep 30
    progress
  done
  if running && [[ -n $STOP_AT_S ]]; then
    # The run has had its share of the session; stop it (driver and children: one process group, from setsid) so
    # the next phases get the GPU to themselves. Checkpoints are written atomically, so none is left half-written.
    say "stopping the stability run after ${SECONDS}s of this command (STOP_AT_S=$STOP_AT_S)"
    kill -TERM -- "-$(cat "$RUN/driver.pid")" 2>/dev/null
    sleep 10
    kill -KILL -- "-$(cat "$RUN/driver.pid")" 2>/dev/null
    progress
    collect partial
    return 0
  fi
  if running; then
    say "still running (this command has run ${SECONDS}s): call stability-wait again"
    progress
    collect partial
    return 0
  fi
  say "stability run finished"
  tail -n 5 "$RUN/driver.log"
  collect
}

collect() {
  # collect [partial]: pack the run's outputs into $OUT (the device call brings $OUT back). Partial: first the
  # verdict, report and plots of the steps recorded so far (--report-only: no training, seconds of CPU), then those,
  # the per-algorithm metrics and the logs, as $OUT/stability-$PRESET-partial.tgz.
  local names=(report.md verdict.json metrics.jsonl ratio_range.png training_curves.png run.json warm_start.json
    driver.log logs)
  local archive=$OUT/stability-$PRESET.tgz files=()
  if [[ ${1:-} == partial ]]; then
    "$PYTHON" -m openrlhf_gmpo stability --preset "$PRESET" --steps "$STEPS" --out "$RUN" --report-only \
      >"$RUN/report-only.log" 2>&1 || say "no partial report yet: $(tail -n 1 "$RUN/report-only.log")"
    names+=(metrics-gmpo.jsonl metrics-grpo.jsonl report-only.log)
    archive=$OUT/stability-$PRESET-partial.tgz
  fi
  for name in "${names[@]}"; do
    [[ -e $RUN/$name ]] && files+=("$name")
  done
  if ((${#files[@]} == 0)); then
    say "nothing to collect in $RUN"
    return 1
  fi
  tar czf "$archive" -C "$RUN" "${files[@]}" && say "collected ${files[*]} into $archive"
}

gpu_tests() {
  # The tests record what they measure (log-prob errors, grad norms, kernel differences) with record_property;
  # tests/conftest.py appends them to MEASURED_LOG as each test ends, so a run cut by its bound keeps them too.
  rm -f "$OUT/gpu_measured.log"
  MEASURED_LOG=$OUT/gpu_measured.log bounded 240 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_losses_gpu.py tests/test_grouped_experts.py tests/test_megatron_gpu.py tests/test_stability_gpu.py 2>&1 |
    tee "$OUT/gpu_tests.log"
  local rc=${PIPESTATUS[0]}
  [[ -f $OUT/gpu_measured.log ]] && tee -a "$OUT/gpu_tests.log" <"$OUT/gpu_measured.log"
  return "$rc"
}

kernel_bench() {
  # Most telling first: the MoE layer table (issue 7's goals); then the loss bench (issue 2's only GPU goal, seconds
  # of GPU work), the profile of where the layer's time goes, and the whole model, which gets what is left. Every
  # script runs whatever the others did; the phase fails if any failed or was stopped (its JSON is then partial).
  local failed=() small=() profile=() size=(--device "$DEVICE" --batch 512 --length 8192 --repeats 20 --warmup 5)
  if ((SMALL)); then
    small=(--device "$DEVICE" --small)
    profile=("${small[@]}" --dtype fp32)
    size=(--device "$DEVICE" --batch 8 --length 64 --repeats 2 --warmup 1)
  fi
  bounded 150 "$PYTHON" bench/bench_moe_layer.py "${small[@]}" --json "$OUT/moe_layer.json" || failed+=(moe_layer)
  bounded 90 "$PYTHON" bench/bench_losses.py "${size[@]}" --json "$OUT/losses.json" || failed+=(losses)
  bounded 90 "$PYTHON" bench/profile_moe_layer.py "${profile[@]}" --json "$OUT/profile_moe_layer.json" ||
    failed+=(profile_moe_layer)
  bounded 150 "$PYTHON" bench/bench_moe_model.py "${small[@]}" --json "$OUT/moe_model.json" || failed+=(moe_model)
  ls -l "$OUT"/*.json
  if ((${#failed[@]})); then
    say "kernel-bench: failed or stopped: ${failed[*]}"
    return 1
  fi
}

status=0
for phase in "$@"; do
  say "phase $phase"
  case $phase in
  setup) setup || { say "setup failed"; exit 1; } ;;
  step-bench) step_bench ;;
  stability-start) stability_start ;;
  stability-wait) stability_wait || status=1 ;;
  collect) collect || status=1 ;;
  gpu-tests) gpu_tests || status=1 ;;
  kernel-bench) kernel_bench || status=1 ;;
  *)
    echo "gpu_session.sh: unknown phase '$phase' (setup step-bench stability-start stability-wait collect gpu-tests kernel-bench)" >&2
    exit 2
    ;;
  esac
done
exit $status
