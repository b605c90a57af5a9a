#!/usr/bin/env bash
# GRPO baseline on the ~200M CountDown MoE: configs/countdown_200m_grpo.yaml as a Ray job.
#   RAY_ADDRESS=http://head-node:8265 bash scripts/moe/countdown_200m_grpo.sh [extra OpenRLHF flags]
#   DRY_RUN=1 bash scripts/moe/countdown_200m_grpo.sh    # print the resolved command, validated by OpenRLHF's parser; no Ray
# NODES / GPUS_PER_NODE / VLLM_TP size the cluster (vLLM engines = NODES * GPUS_PER_NODE / VLLM_TP, colocated);
# MODEL / DATASET override the preset's model and prompt data.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
VLLM_TP="${VLLM_TP:-1}"
MODEL="${MODEL:-$REPO_ROOT/ckpt/countdown-200m-sft}"
DATASET="${DATASET:-$REPO_ROOT/data/countdown/train.jsonl}"

submit_preset configs/countdown_200m_grpo.yaml "$@"
