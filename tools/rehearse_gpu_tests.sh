#!/usr/bin/env bash
# Runs the bodies of the GPU-only tests on CPU, to catch mistakes in them before a GPU session spends minutes on them.
# A copy of tests/ in a temporary folder gets: no GPU skip, "cuda" -> "cpu", nccl -> gloo, megatron's CPU shims,
# GroupedExperts' grouped path forced on. The [cuda] MoE-layer case only moves its CPU twin to CUDA: not run.
# Checks that fail only because the device is a CPU (bf16 on CUDA only, compiled decoding, GroupedExperts chosen on
# CUDA, recompute's CUDA RNG tracker, megatron's own optimizer on CUDA only) are expected; the list is in
# docs/gpu-runs.md. Usage: [PYTHON=.venv/bin/python] bash tools/rehearse_gpu_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[[ $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON  # the venv's own path: resolving its symlink would leave the venv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r tests pyproject.toml "$work"/
cd "$work/tests"
sed -i 's/    if _cuda_available():/    if True:/' conftest.py
sed -i -e 's/torch.cuda.set_device(0)/hm.install_cpu_shims()/' -e 's/"nccl"/"gloo"/' \
  -e 's/\.cuda()/.cpu()/g' -e 's/device="cuda"/device="cpu"/g' test_megatron_gpu.py test_stability_gpu.py
# the loss test compares a "cuda" result with a "cpu" one: compute both on CPU
sed -i -e 's/leaf = inputs\[0\].to(device)/leaf = inputs[0].to("cpu")/' -e 's/rest = \[t.to(device)/rest = [t.to("cpu")/' \
  test_losses_gpu.py
# GroupedExperts' GPU tests: megatron's CPU shims, and the grouped path forced on CPU (torch's reference grouped_mm)
sed -i -e 's/^def test_gpu_\([a-z0-9_]*\)(pg_collection, /def test_gpu_\1(pg_collection, cpu_shims, /' \
  -e 's/device="cuda"/device="cpu"/g' \
  -e 's/^    assert grouped.fallback_reason(batch\[0\]) is None/    grouped.run_grouped_on_cpu = True\n&/' \
  test_grouped_experts.py
cd "$work"
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/test_megatron_gpu.py tests/test_stability_gpu.py \
  tests/test_losses_gpu.py tests/test_grouped_experts.py \
  --deselect "tests/test_grouped_experts.py::test_moe_layer_with_grouped_experts_matches_local_spec[cuda]" "$@"
