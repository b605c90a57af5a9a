# shellcheck shell=bash
# Sourced by scripts/{dense,moe}/*.sh: submit one preset as a Ray job running python3 -m openrlhf_gmpo.train_ppo_ray,
# or, with DRY_RUN=1, print the fully resolved command after OpenRLHF's own parser validated it (no Ray contacted).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The repository is the job's working_dir: Ray uploads it and puts it on sys.path of the driver and of every
# worker, so openrlhf_gmpo (the policy actor class Ray unpickles by reference), configs/ and the reward files are
# importable/readable on every node. Large local folders stay out of the upload: pass models and data that live in
# them as absolute paths on storage all nodes share.
RUNTIME_ENV_JSON="$(printf '{"working_dir": "%s", "excludes": [".git", ".venv", ".cache", "ckpt", "runs", "data", "*.egg-info"]}' "$REPO_ROOT")"

# note_missing_input NAME VALUE: a dry run's note when VALUE is a local path that does not exist here. A Hugging Face
# Hub id (exactly owner/name) is left alone. A relative path is resolved in the repository, as in the job, which runs
# in Ray's copy of it.
note_missing_input() {
  local name=$1 value=$2
  [[ $value =~ ^[^/.][^/]*/[^/]+$ && ! -e $REPO_ROOT/$value ]] && return 0 # a Hub id
  if [[ $value == /* && ! -e $value ]]; then
    echo "# note: $name $value does not exist here; the job needs it at this path on every node" >&2
  elif [[ $value != /* && ! -e $REPO_ROOT/$value ]]; then
    echo "# note: $name $value is not in the repository; the job reads it from its copy of the repository" >&2
  fi
}

# submit_preset PRESET [OPENRLHF_FLAG ...]
# The calling script sets NODES, GPUS_PER_NODE, VLLM_TP (vLLM engines = NODES * GPUS_PER_NODE / VLLM_TP, colocated),
# MODEL and DATASET; the flags after PRESET (the script's own, then the user's) override the preset and these.
# OUT_DIR (default: ckpt/<preset name> in the repository) receives the final model, the resumable checkpoints and the
# TensorBoard logs: an absolute path, because the job runs inside Ray's unpacked copy of the repository, where
# OpenRLHF's relative defaults (./ckpt) would put every run into one temporary folder. On several nodes, use storage
# they all share.
submit_preset() {
  local name
  for name in NODES GPUS_PER_NODE VLLM_TP; do # bash arithmetic below would misread anything else
    if [[ ! ${!name} =~ ^[1-9][0-9]*$ ]]; then
      echo "$(basename "$0"): $name=${!name} must be a positive whole number" >&2
      return 2
    fi
  done
  if ((NODES * GPUS_PER_NODE % VLLM_TP)); then # the engines would leave GPUs idle, or be none at all
    echo "$(basename "$0"): VLLM_TP=$VLLM_TP must divide NODES x GPUS_PER_NODE = $((NODES * GPUS_PER_NODE))" >&2
    return 2
  fi
  local out_dir="${OUT_DIR:-$REPO_ROOT/ckpt/$(basename "$1" .yaml)}"
  local outputs=(
    --ckpt.output_dir "$out_dir"
    --ckpt.path "$out_dir/checkpoints"
    --logger.tensorboard_dir "$out_dir/tensorboard"
  )
  local cluster=(
    --actor.num_nodes "$NODES"
    --actor.num_gpus_per_node "$GPUS_PER_NODE"
    --vllm.num_engines "$((NODES * GPUS_PER_NODE / VLLM_TP))"
    --vllm.tensor_parallel_size "$VLLM_TP"
  )
  local inputs=(
    --actor.model_name_or_path "$MODEL"
    --data.prompt_dataset "$DATASET"
  )
  local launcher=(-m openrlhf_gmpo.train_ppo_ray --preset "$1" "${cluster[@]}" "${inputs[@]}" "${outputs[@]}" "${@:2}")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    note_missing_input "MODEL" "$MODEL"
    note_missing_input "DATASET" "$DATASET"
    (cd "$REPO_ROOT" && "${PYTHON:-python3}" "${launcher[@]}" --dry-run)
    return
  fi
  : "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address (e.g. http://head-node:8265) or run with DRY_RUN=1}"
  ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$RUNTIME_ENV_JSON" -- python3 "${launcher[@]}"
}
