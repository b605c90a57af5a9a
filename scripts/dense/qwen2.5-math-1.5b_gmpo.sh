#!/usr/bin/env bash
# GMPO on Qwen2.5-Math-1.5B, MATH levels 3-5: configs/qwen2.5-math-1.5b_gmpo.yaml as a Ray job.
#   RAY_ADDRESS=http://head-node:8265 bash scripts/dense/qwen2.5-math-1.5b_gmpo.sh [extra OpenRLHF flags]
#   DRY_RUN=1 bash scripts/dense/qwen2.5-math-1.5b_gmpo.sh    # print the resolved command, validated by OpenRLHF's parser; no Ray
# NODES / GPUS_PER_NODE / VLLM_TP size the cluster (vLLM engines = NODES * GPUS_PER_NODE / VLLM_TP, colocated);
# MODEL / DATASET override the preset's model and prompt data.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-1}"
MODEL="${MODEL:-Qwen/Qwen2.5-Math-1.5B}"
DATASET="${DATASET:-understand-r1-zero/datasets/train/math_lvl3to5_8k}"

submit_preset configs/qwen2.5-math-1.5b_gmpo.yaml "$@"
