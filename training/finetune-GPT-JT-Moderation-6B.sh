#!/usr/bin/env bash
# GPT-JT-Moderation-6B: fine-tune GPT-JT-6B-v1 (GPT-J, 28 layers, hidden 4096) on OIG-moderation
# in the moderation format, with the original model card's settings: AdamW, batch 16 x 4 = 64,
# LR warm-up to 1e-5 over 100 steps, then constant. 2 pipeline stages x 4 data-parallel replicas on one node of
# 8 GPUs (the original's GPT-JT layout: 14 layers per stage).
#
#   python tools/convert_from_hf.py --model-name togethercomputer/GPT-JT-6B-v1 \
#       --save-dir pretrained/GPT-JT-6B-v1 --dtype float16
#   python data/OIG-moderation/prepare.py          # gated: accept its terms, set a token first
#   bash training/finetune-GPT-JT-Moderation-6B.sh
#   python tools/convert_to_hf.py --ckpt-path model_ckpts/GPT-JT-Moderation-6B \
#       --save-path huggingface_models/GPT-JT-Moderation-6B --fp16
#   python inference/moderate.py --model huggingface_models/GPT-JT-Moderation-6B --gpu-id 0 "hi"
#
# Differences from the model card, on purpose or by the kit's design:
# - the data is chosen explicitly as `data/OIG-moderation/files:moderation` (the moderation
#   packer), not by its file name; `--loss-on bot` would learn only the labels (the original
#   learned every token: kept here);
# - 1F1B with per-layer activation checkpointing, so each stage fits an 80 GB GPU
#   (`python training/plan.py --recipe training/finetune-GPT-JT-Moderation-6B.sh`).
# Environment: FINETUNE_TOTAL_STEPS (default 20000), FINETUNE_CHECKPOINT_STEPS (default 100),
# FINETUNE_CHECKPOINT_PATH; multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; NET_IF;
# GPUS_PER_NODE (default 8); PYTHON. Extra arguments go to the trainer.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
# Grow allocator segments instead of caching fixed blocks: less fragmentation when the fp32
# gradient buckets of one step and the activations of the next want the same bytes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

MODEL_NAME=GPT-JT-Moderation-6B
BASE_MODEL="$ROOT/pretrained/GPT-JT-6B-v1/togethercomputer_GPT-JT-6B-v1"

ARGS=(
  --model-name "$BASE_MODEL" --tokenizer-name "$BASE_MODEL"
  --project-name together --model-type gptj --optimizer adam --seed 42
  --load-pretrained-model true --task-name "$ROOT/data/OIG-moderation/files:moderation"
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/$MODEL_NAME}"
  --total-steps "${FINETUNE_TOTAL_STEPS:-20000}" --warmup-steps 100 --lr-decay-style constant
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-100}"
  --num-checkpoints "${FINETUNE_NUM_CHECKPOINTS:-2}"
  # --batch-size is global: 64 sequences = the card's 16 per replica x 4 replicas.
  --lr 1e-5 --seq-length 2048 --batch-size 64 --micro-batch-size 1 --gradient-accumulate-step 1
  --num-layers 14 --embedding-dim 4096
  --pipeline-group-size 2 --data-group-size 4
  --fp16 --dp-backend nccl --dp-mode allreduce --pp-mode 1f1b --activation-checkpointing layers
  --profiling no-profiling
)
[ -n "${NET_IF:-}" ] && ARGS+=(--net-interface "$NET_IF")

exec "$PYTHON" "$DIR/launch.py" --device cuda --nproc "${GPUS_PER_NODE:-8}" -- \
  "$DIR/dist_clm_train.py" "${ARGS[@]}" "$@"
