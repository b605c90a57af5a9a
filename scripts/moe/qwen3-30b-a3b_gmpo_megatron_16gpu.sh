#!/usr/bin/env bash
# GMPO on Qwen3-30B-A3B, DeepScaleR, megatron backend (16 GPUs): configs/qwen3-30b-a3b_gmpo_megatron_16gpu.yaml as a Ray job.
#   RAY_ADDRESS=http://head-node:8265 bash scripts/moe/qwen3-30b-a3b_gmpo_megatron_16gpu.sh [extra OpenRLHF / --megatron.* flags]
#   DRY_RUN=1 bash scripts/moe/qwen3-30b-a3b_gmpo_megatron_16gpu.sh    # print the resolved command, validated by OpenRLHF's parser; no Ray
# NODES / GPUS_PER_NODE / VLLM_TP size the cluster (vLLM engines = NODES * GPUS_PER_NODE / VLLM_TP, colocated);
# EP / PP set --megatron.ep / --megatron.pp (pipeline stages: docs/megatron.md, "Choosing the sizes");
# MODEL / DATASET override the preset's model and prompt data.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-4}"
EP="${EP:-8}"
PP="${PP:-1}"
MODEL="${MODEL:-Qwen/Qwen3-30B-A3B}"
DATASET="${DATASET:-agentica-org/DeepScaleR-Preview-Dataset}"

submit_preset configs/qwen3-30b-a3b_gmpo_megatron_16gpu.yaml --megatron.ep "$EP" --megatron.pp "$PP" "$@"
