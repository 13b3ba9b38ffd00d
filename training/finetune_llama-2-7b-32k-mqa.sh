#!/usr/bin/env bash
# LLaMA-2-7B-32K: long-context fine-tune for multi-document question answering, 32K-token sequences,
# 8 pipeline stages x 4 layers on one node of 8 GPUs, bf16 (as upstream's 32K recipes).
#
#   python pretrained/Llama-2-7B-32K-beta/prepare.py
#   # the data: togethercomputer/Long-Data-Collections, fine-tune/natural_questions*.jsonl (decompressed) in
#   #   data/Long-Data-Collections/fine-tune/ (huggingface-cli download --repo-type dataset ...)
#   bash training/finetune_llama-2-7b-32k-mqa.sh
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

MODEL_NAME=llama-2-7b-32k-mqa
BASE_MODEL="$ROOT/pretrained/Llama-2-7B-32K-beta/togethercomputer_LLaMA-2-7B-32K"
DATA="${FINETUNE_DATA:-$ROOT/data/Long-Data-Collections/fine-tune/natural_questions}"

ARGS=(
  --model-name "$BASE_MODEL" --tokenizer-name "$BASE_MODEL"
  --project-name together --model-type llama --optimizer adam --seed 42
  --load-pretrained-model true --task-name "$DATA:1"
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/$MODEL_NAME}"
  --total-steps "${FINETUNE_TOTAL_STEPS:-10}" --warmup-steps 0
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-10}"
  # Keep the newest 2 checkpoints (each holds weights, fp32 masters and Adam state).
  --num-checkpoints "${FINETUNE_NUM_CHECKPOINTS:-2}"
  --lr 2e-5 --seq-length 32768 --batch-size 8 --micro-batch-size 1 --gradient-accumulate-step 4
  --num-layers 4 --embedding-dim 4096
  --pipeline-group-size 8 --data-group-size 1
  # 1F1B over 8 stages needs >= 8 micro-batches: 8 per pass x 4 passes = 32 sequences per
  # step (upstream: 4 x 8); every 32K-token layer recomputes its activations in the backward.
  --activation-checkpointing layers
  --bf16 --dp-backend nccl --dp-mode allreduce --pp-mode 1f1b --profiling no-profiling
)
[ -n "${NET_IF:-}" ] && ARGS+=(--net-interface "$NET_IF")

exec "$PYTHON" "$DIR/launch.py" --device cuda --nproc "${GPUS_PER_NODE:-8}" -- \
  "$DIR/dist_clm_train.py" "${ARGS[@]}" "$@"
