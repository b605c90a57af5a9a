#!/usr/bin/env bash
# Creates .venv (Python 3.12) with torch, OpenRLHF 0.11.2, megatron-core 0.19.2 and this package, editable.
# Idempotent: skips all work when .venv already matches pyproject.toml and the constraints files.
#
# constraints.txt holds the pins we chose, with reasons; constraints.lock pins every other package to the versions
# the suite last passed with (tools/lock.sh writes it), so a new release of a dependency (ruff, numpy, a package
# OpenRLHF imports) cannot change a fresh install. UNLOCKED=1 installs from constraints.txt alone.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.12}
export PYENV_VERSION=${PYENV_VERSION:-3.12.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PWD/.cache/pip}

stamp="$VENV/.openrlhf-gmpo-installed"
files=(constraints.txt)
[[ ${UNLOCKED:-0} == 1 ]] || files+=(constraints.lock)
want=$(cat pyproject.toml "${files[@]}" tools/install.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "install.sh: '$PYTHON' not found; openrlhf-gmpo needs Python 3.12 (megatron-core >= 0.17 requires it)." >&2
  exit 1
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --progress-bar off)
for file in "${files[@]}"; do pip+=(-c "$file"); done

echo "install.sh: installing into $VENV (first time ~2-5 min: torch, OpenRLHF 0.11.2, megatron-core 0.19.2)"
"${pip[@]}" --upgrade pip setuptools wheel packaging psutil ninja
"${pip[@]}" torch
# flash-attn only builds its CUDA extension where nvcc and a GPU exist; without them it installs as pure Python,
# which is all OpenRLHF needs to import on CPU.
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  "${pip[@]}" --no-build-isolation flash-attn
DS_BUILD_OPS=0 "${pip[@]}" -e ".[test]"
echo "$want" >"$stamp"
echo "install.sh: done"
