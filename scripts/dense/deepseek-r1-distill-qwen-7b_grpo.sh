#!/usr/bin/env bash
# GRPO baseline on DeepSeek-R1-Distill-Qwen-7B, MATH levels 3-5: configs/deepseek-r1-distill-qwen-7b_grpo.yaml as a Ray job.
#   RAY_ADDRESS=http://head-node:8265 bash scripts/dense/deepseek-r1-distill-qwen-7b_grpo.sh [extra OpenRLHF flags]
#   DRY_RUN=1 bash scripts/dense/deepseek-r1-distill-qwen-7b_grpo.sh    # print the resolved command, validated by OpenRLHF's parser; no Ray
# NODES / GPUS_PER_NODE / VLLM_TP size the cluster (vLLM engines = NODES * GPUS_PER_NODE / VLLM_TP, colocated);
# MODEL / DATASET override the preset's model and prompt data.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-1}"
MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"
DATASET="${DATASET:-understand-r1-zero/datasets/train/math_lvl3to5_8k}"

submit_preset configs/deepseek-r1-distill-qwen-7b_grpo.yaml "$@"
