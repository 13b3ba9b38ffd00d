#!/usr/bin/env bash
# Qwen2.5-0.5B-Instruct: fine-tune Qwen/Qwen2.5-0.5B-Instruct (24 layers, hidden 896, grouped-query
# attention with biased q/k/v, tied embeddings) on OIG chip2, 8 data-parallel replicas of the whole
# model on one node of 8 GPUs (no pipeline: the model fits one GPU many times over), bf16.
#
#   python pretrained/Qwen2.5-0.5B-Instruct/prepare.py && python data/OIG-chip2/prepare.py
#   bash training/finetune-qwen2.5-0.5b-instruct.sh
#   python training/plan.py --recipe training/finetune-qwen2.5-0.5b-instruct.sh --gpu-memory 80
#
# Environment: FINETUNE_TOTAL_STEPS, FINETUNE_CHECKPOINT_STEPS, FINETUNE_NUM_CHECKPOINTS,
# FINETUNE_CHECKPOINT_PATH;
# multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; NET_IF; PYTHON.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"

MODEL_NAME=Qwen2.5-0.5B-Instruct-OIG
BASE_MODEL="$ROOT/pretrained/Qwen2.5-0.5B-Instruct/Qwen_Qwen2.5-0.5B-Instruct"

ARGS=(
  --model-name "$BASE_MODEL" --tokenizer-name "$BASE_MODEL"
  --project-name together --model-type qwen2 --optimizer adam --seed 42
  --load-pretrained-model true --task-name "$ROOT/data/OIG-chip2/files:1"
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/$MODEL_NAME}"
  --total-steps "${FINETUNE_TOTAL_STEPS:-10}" --warmup-steps 0
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-10}"
  # Keep the newest 2 checkpoints (each holds weights, fp32 masters and Adam state).
  --num-checkpoints "${FINETUNE_NUM_CHECKPOINTS:-2}"
  # --batch-size is global: 64 sequences, 8 per replica in micro-batches of 4.
  --lr 1e-5 --seq-length 2048 --batch-size 64 --micro-batch-size 4 --gradient-accumulate-step 1
  --embedding-dim 896
  --pipeline-group-size 1 --data-group-size 8
  # Each layer recomputes its activations in the backward (the 152k-token vocabulary's loss
  # buffers dominate anyway): `python training/plan.py --recipe <this file>` shows the bytes.
  --activation-checkpointing layers
  --bf16 --dp-backend nccl --dp-mode allreduce --profiling no-profiling
)
[ -n "${NET_IF:-}" ] && ARGS+=(--net-interface "$NET_IF")

exec "$PYTHON" "$DIR/launch.py" --device cuda --nproc "${GPUS_PER_NODE:-8}" -- \
  "$DIR/dist_clm_train.py" "${ARGS[@]}" "$@"
