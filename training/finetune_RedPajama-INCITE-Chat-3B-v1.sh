#!/usr/bin/env bash
# RedPajama-INCITE-Chat-3B-v1: fine-tune RedPajama-INCITE-Base-3B-v1 (32 layers, hidden 2560) on
# OIG chip2, 4 pipeline stages x 2 data-parallel replicas on one node of 8 GPUs.
#
#   python pretrained/RedPajama-3B/prepare.py && python data/OIG-chip2/prepare.py
#   bash training/finetune_RedPajama-INCITE-Chat-3B-v1.sh
#
# Environment: FINETUNE_TOTAL_STEPS, FINETUNE_CHECKPOINT_STEPS, FINETUNE_NUM_CHECKPOINTS,
# FINETUNE_CHECKPOINT_PATH;
# multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; NET_IF; PYTHON.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
# Grow allocator segments instead of caching fixed blocks: less fragmentation when the fp32
# gradient buckets of one step and the activations of the next want the same bytes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

MODEL_NAME=RedPajama-INCITE-Chat-3B-v1
BASE_MODEL="$ROOT/pretrained/RedPajama-3B/togethercomputer_RedPajama-INCITE-Base-3B-v1"

ARGS=(
  --model-name "$BASE_MODEL" --tokenizer-name "$BASE_MODEL"
  --project-name together --model-type gptneox --optimizer adam --seed 42
  --load-pretrained-model true --task-name "$ROOT/data/OIG-chip2/files:1"
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/$MODEL_NAME}"
  --total-steps "${FINETUNE_TOTAL_STEPS:-10}" --warmup-steps 0
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-10}"
  # Keep the newest 2 checkpoints (each holds weights, fp32 masters and Adam state).
  --num-checkpoints "${FINETUNE_NUM_CHECKPOINTS:-2}"
  # --batch-size is global: 64 sequences = upstream's 32 per replica x 2 replicas.
  --lr 1e-5 --seq-length 2048 --batch-size 64 --micro-batch-size 1 --gradient-accumulate-step 1
  --num-layers 8 --embedding-dim 2560
  --pipeline-group-size 4 --data-group-size 2
  # 1F1B holds at most pp - stage micro-batches per stage, and each layer recomputes its
  # activations in the backward: `python training/plan.py --recipe <this file>` shows the bytes.
  --activation-checkpointing layers
  --fp16 --dp-backend nccl --dp-mode allreduce --pp-mode 1f1b --profiling no-profiling
)
[ -n "${NET_IF:-}" ] && ARGS+=(--net-interface "$NET_IF")

exec "$PYTHON" "$DIR/launch.py" --device cuda --nproc "${GPUS_PER_NODE:-8}" -- \
  "$DIR/dist_clm_train.py" "${ARGS[@]}" "$@"
