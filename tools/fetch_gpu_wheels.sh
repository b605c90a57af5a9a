#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the GPU box lacks: the box has no internet, so whatever its image (see
# the device notes: Python 3.12, torch 2.11, transformers 5.17, peft, accelerate, ...) does not hold travels from
# here and is installed there by `tools/gpu_session.sh setup` (pip --no-index --no-deps --target).
#
#   tools/fetch_gpu_wheels.sh            # idempotent: fetches or builds only what .whl/ does not hold yet
#
# What the box needs beyond its image, and why:
#   megatron-core                 openrlhf_gmpo.megatron, tests/test_megatron_gpu.py, test_grouped_experts.py, MoE benches
#   openrlhf                      bench/bench_losses.py compares against openrlhf.models.loss.PolicyLoss (the real one)
#   deepspeed, flash-attn         imported by openrlhf.models (utils/model, ring_attn_utils); built here as pure
#                                 Python (no CUDA ops; flash_attn_2_cuda is stubbed by the bench and tests/conftest.py)
#   hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection)
#                                 deepspeed's own imports (its config classes are pydantic models)
#   pylatexenc                    openrlhf.utils (math_utils), imported by openrlhf.models.model via logging_utils
# Not carried: ray, vllm, datasets, bitsandbytes, ... (OpenRLHF's other requirements): nothing run on the box imports
# them; openrlhf_gmpo.megatron.actor needs ray and is not imported there.
#
# pydantic is pinned to 2.12.x and typing-inspection to 0.4.2 because later releases require
# typing-extensions >= 4.15/4.16, and the box's own typing-extensions is not carried (it is torch's).
set -euo pipefail
cd "$(dirname "$0")/.."

WHL=${WHL:-.whl}
PYTHON=${PYTHON:-.venv/bin/python} # builds deepspeed / flash-attn: needs torch, setuptools and wheel
[[ -x $PYTHON ]] || PYTHON=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PWD/.cache/pip}

# Binary wheels for the box: CPython 3.12 on x86-64 Linux.
DOWNLOAD=(megatron-core==0.19.2 openrlhf==0.11.2 hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5
  annotated-types==0.7.0 typing-inspection==0.4.2 pylatexenc==2.11)
# Published only as source: built here into pure-Python wheels (the wheel cache in .cache/pip keeps them).
BUILD=(deepspeed==0.19.6 flash-attn==2.8.3)

mkdir -p "$WHL"
grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '.whl/' .gitignore 2>/dev/null ||
  echo "fetch_gpu_wheels.sh: warning: .whl/ is not in .gitignore" >&2

# The file-name form of a distribution name: lower case, runs of -_. as one '_'.
wheel_name() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }

# 0 when $WHL holds NAME==VERSION; removes any other version of NAME, since two versions stop the box's install.
have() {
  local name version f found=1
  name=$(wheel_name "${1%%==*}")
  version=${1#*==}
  for f in "$WHL"/*.whl; do
    [[ -e $f ]] || continue
    [[ $(wheel_name "$(basename "$f" | cut -d- -f1)") == "$name" ]] || continue
    if [[ $(basename "$f" | cut -d- -f2) == "$version" ]]; then
      found=0
    else
      echo "fetch_gpu_wheels.sh: removing $(basename "$f") (want $1)"
      rm -f "$f"
    fi
  done
  return $found
}

wanted=()
for spec in "${DOWNLOAD[@]}"; do
  have "$spec" || wanted+=("$spec")
done
if ((${#wanted[@]})); then
  echo "fetch_gpu_wheels.sh: downloading ${wanted[*]}"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHL" "${wanted[@]}"
fi

for spec in "${BUILD[@]}"; do
  have "$spec" && continue
  echo "fetch_gpu_wheels.sh: building $spec (pure Python)"
  # As tools/install.sh: no DeepSpeed ops, no flash-attn CUDA extension; --no-build-isolation because both
  # setup.py files import torch.
  DS_BUILD_OPS=0 FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$spec"
done

# Every wheel here must install on the box: py3-none-any or cp312 manylinux x86-64.
status=0
listed=" "
for spec in "${DOWNLOAD[@]}" "${BUILD[@]}"; do
  listed+="$(wheel_name "${spec%%==*}") "
done
for f in "$WHL"/*.whl; do
  [[ $listed == *" $(wheel_name "$(basename "$f" | cut -d- -f1)") "* ]] ||
    echo "fetch_gpu_wheels.sh: warning: $(basename "$f") is not one of this script's wheels (it travels too)" >&2
  case $(basename "$f") in
  *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-cp312-manylinux*x86_64.whl) ;;
  *)
    echo "fetch_gpu_wheels.sh: $(basename "$f") is not for CPython 3.12 on x86-64 Linux" >&2
    status=1
    ;;
  esac
done
for spec in "${DOWNLOAD[@]}" "${BUILD[@]}"; do
  have "$spec" || {
    echo "fetch_gpu_wheels.sh: $spec is missing from $WHL" >&2
    status=1
  }
done
du -ch "$WHL"/*.whl | tail -n 1 | sed "s|total|in $WHL (keep it well under 40M: the tree sent to the box is capped at 64 MiB)|"
exit $status
