#!/usr/bin/env bash
# LoRA fine-tune of RedPajama-INCITE-Chat-3B-v1 on one GPU, with the original LoRA example's
# settings (training/lora/example/redpajama-incite-chat-3b.py upstream): PEFT LoRA r=16,
# alpha=32, dropout 0.05 on query_key_value, bias none; batch 4 x gradient accumulation 4,
# warm-up 100, 200 steps, lr 2e-4, fp16. Upstream ran HF Trainer (~14 GB of GPU memory); here it
# is the pipeline trainer with one stage, so resume, checkpoints and conversion work as for full
# fine-tuning. The checkpoint holds only the adapters.
#
#   python pretrained/RedPajama-3B/prepare.py --model-name togethercomputer/RedPajama-INCITE-Chat-3B-v1
#   python data/OIG-chip2/prepare.py
#   bash training/lora/finetune-redpajama-incite-chat-3b-lora.sh
#   python tools/export_lora.py --ckpt-path model_ckpts/redpajama-incite-chat-3b-lora --save-path adapters/redpajama-3b-lora
#   python inference/bot.py --model togethercomputer/RedPajama-INCITE-Chat-3B-v1 --adapter adapters/redpajama-3b-lora
#
# Environment: FINETUNE_TOTAL_STEPS, FINETUNE_CHECKPOINT_STEPS, FINETUNE_CHECKPOINT_PATH, BASE_MODEL,
# PYTHON. Extra flags pass through (e.g. --load-in-4bit --optimizer paged-8bit-adam for QLoRA: an
# NF4 base and QLoRA's paged 8-bit optimizer).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$(dirname "$DIR")")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
# Grow allocator segments instead of caching fixed blocks: less fragmentation when the fp32
# gradient buckets of one step and the activations of the next want the same bytes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

BASE_MODEL="${BASE_MODEL:-$ROOT/pretrained/RedPajama-3B/togethercomputer_RedPajama-INCITE-Chat-3B-v1}"

exec "$PYTHON" "$ROOT/training/launch.py" --device cuda --nproc 1 -- \
  "$ROOT/training/dist_clm_train.py" \
  --model-name "$BASE_MODEL" --model-type gptneox \
  --task-name "$ROOT/data/OIG-chip2/files" \
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/redpajama-incite-chat-3b-lora}" \
  --total-steps "${FINETUNE_TOTAL_STEPS:-200}" --warmup-steps 100 \
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-50}" --num-checkpoints 2 \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules query_key_value \
  --lora-bias none \
  --lr 2e-4 --seq-length 2048 --batch-size 4 --micro-batch-size 1 --gradient-accumulate-step 4 \
  --fp16 --optimizer adam --seed 42 "$@"
