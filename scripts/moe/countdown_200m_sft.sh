#!/usr/bin/env bash
# SFT of the ~200M CountDown Qwen3-MoE (8 experts, 1 active per token) on the exact solver's worked solutions, so the
# randomly initialised model learns the <think>/<answer> format before GMPO or GRPO RL (scripts/moe/countdown_200m_*.sh).
#
#   openrlhf-gmpo countdown data  --out data/countdown
#   openrlhf-gmpo countdown model --size 200m --out ckpt/countdown-200m-init
#   bash scripts/moe/countdown_200m_sft.sh [more openrlhf.cli.train_sft flags, which override ours]
#
# DRY_RUN=1 prints the resolved command and validates it with OpenRLHF's own train_sft parser, without training
# (python -m openrlhf_gmpo.countdown.check_sft_args; on a machine without flash-attn put tests/stub_site on PYTHONPATH).
set -euo pipefail

N_GPUS="${N_GPUS:-1}"                                    # GPUs on this node for the deepspeed launcher
DATA_DIR="${DATA_DIR:-data/countdown}"                   # from `openrlhf-gmpo countdown data`
INIT_MODEL="${INIT_MODEL:-ckpt/countdown-200m-init}"     # from `openrlhf-gmpo countdown model --size 200m`
SAVE_PATH="${SAVE_PATH:-ckpt/countdown-200m-sft}"        # the RL scripts start from here
PYTHON="${PYTHON:-python}"

# DeepSpeed needs batch = micro-batch x GPUs x accumulation steps: split the 256 evenly, at most 64 per GPU step.
BATCH=256
if [[ ! "$N_GPUS" =~ ^[0-9]+$ ]] || ((N_GPUS < 1 || BATCH % N_GPUS)); then
  echo "countdown_200m_sft.sh: N_GPUS=$N_GPUS must divide the batch of $BATCH (1, 2, 4, 8, ...)" >&2
  exit 2
fi
MICRO_BATCH=$((BATCH / N_GPUS < 64 ? BATCH / N_GPUS : 64))

model_args=(
  --model.model_name_or_path "$INIT_MODEL"
  --model.aux_loss_coef 0.001                            # load balancing while the experts form from random init
)
data_args=(
  --data.dataset "$DATA_DIR/sft_train.jsonl"
  --eval.dataset "$DATA_DIR/sft_val.jsonl"
  --data.input_key prompt
  --data.output_key response
  --data.apply_chat_template                             # the tokenizer's <|user|>/<|assistant|> template
  --data.max_len 128                                     # prompt ~26 tokens + worked solution <= ~60
)
train_args=(
  --train.batch_size "$BATCH"                            # the paper's CountDown batch
  --train.micro_batch_size "$MICRO_BATCH"
  --train.max_epochs 10                                  # 10k traces: a from-scratch model needs many passes
  --train.seed 42
  --adam.lr 3e-4                                         # small model trained from scratch, not a fine-tune
  --adam.weight_decay 0.01
  --lr_warmup_ratio 0.03
  --max_norm 1.0
)
ds_args=(
  --ds.zero_stage 1
  --ds.param_dtype bf16
  --ds.attn_implementation flash_attention_2
)
ckpt_args=(
  --ckpt.output_dir "$SAVE_PATH"
  --eval.steps 50
  --logger.logging_steps 10
)

train_sft_args=("${model_args[@]}" "${data_args[@]}" "${train_args[@]}" "${ds_args[@]}" "${ckpt_args[@]}" "$@")
launch=(deepspeed --num_gpus "$N_GPUS" --module openrlhf.cli.train_sft "${train_sft_args[@]}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${launch[@]}"
  printf '\n'
  # The dry run checks the flags only; say so when the inputs it names are not there (yet).
  for input in "$DATA_DIR/sft_train.jsonl" "$INIT_MODEL"; do
    [[ -e "$input" ]] || echo "note: $input does not exist (relative paths are from $(pwd))" >&2
  done
  exec "$PYTHON" -m openrlhf_gmpo.countdown.check_sft_args "${train_sft_args[@]}"
fi
exec "${launch[@]}"
