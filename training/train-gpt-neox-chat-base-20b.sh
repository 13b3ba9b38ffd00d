#!/usr/bin/env bash
# GPT-NeoXT-Chat-Base-20B: fine-tune GPT-NeoX-20B on the OIG mix, 8 pipeline stages x 6 layers
# on one node of 8 GPUs (as upstream OpenChatKit).
#
#   python pretrained/GPT-NeoX-20B/prepare.py && python data/OIG/prepare.py
#   bash training/train-gpt-neox-chat-base-20b.sh
#
# Environment: FINETUNE_TOTAL_STEPS, FINETUNE_CHECKPOINT_STEPS, FINETUNE_NUM_CHECKPOINTS,
# FINETUNE_CHECKPOINT_PATH;
# multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (run on every node);
# NET_IF (network interface for gloo/NCCL, optional); PYTHON.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
# Grow allocator segments instead of caching fixed blocks: less fragmentation when the fp32
# gradient buckets of one step and the activations of the next want the same bytes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

MODEL_NAME=GPT-Neo-XT-Chat-Base-20B
BASE_MODEL="$ROOT/pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b"
OIG="$ROOT/data/OIG/files"
DATASETS="\
$OIG/unified_ni.jsonl:0.2,\
$OIG/unified_p3.jsonl:0.5,\
$OIG/unified_flan.jsonl:0.2,\
$OIG/unified_chip2.jsonl:0.01,\
$OIG/unified_rallio_safety_and_prosocial.jsonl:0.1,\
$OIG/unified_soda_dialog.jsonl:0.1,\
$OIG/unified_unifiedskg_instructions.jsonl:0.1,\
$OIG/unified_merged_code_xp3.jsonl:0.1,\
$OIG/unified_oscar_en_sample_dialog.jsonl:0.1,\
$OIG/unified_ul2_plus_oscar_en_sample_dialog.jsonl:0.1,\
$OIG/unified_multi_news.jsonl:0.05,\
$OIG/unified_openai_summarize_tldr.jsonl:0.05,\
$OIG/unified_squad_v2.jsonl:0.01,\
$OIG/unified_nq.jsonl:0.01,\
$OIG/unified_poetry_instructions.jsonl:0.01,\
$OIG/unified_sqlv2.jsonl:0.01,\
$OIG/unified_unnatural_instructions.jsonl:0.01,\
$OIG/unified_conv_finqa.jsonl:0.01,\
$OIG/unified_essays.jsonl:0.01,\
$OIG/unified_plot_screenplay_books_dialog.jsonl:0.01,\
$OIG/unified_grade_school_math_instructions.jsonl:0.01,\
$OIG/unified_mathqa_flanv2_kojma_cot.jsonl:0.01,\
$OIG/unified_joke_explanations.jsonl:0.01,\
$OIG/unified_cuad.jsonl:0.01,\
$OIG/unified_abstract_infill.jsonl:0.1,\
$OIG/unified_image_prompts_instructions.jsonl:0.01"

ARGS=(
  --model-name "$BASE_MODEL" --tokenizer-name "$BASE_MODEL"
  --project-name together --model-type gptneox --optimizer adam --seed 42
  --load-pretrained-model true --task-name "$DATASETS"
  --checkpoint-path "${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/$MODEL_NAME}"
  --total-steps "${FINETUNE_TOTAL_STEPS:-20000}" --warmup-steps 10
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-100}"
  # Keep the newest 2 checkpoints (each holds weights, fp32 masters and Adam state).
  --num-checkpoints "${FINETUNE_NUM_CHECKPOINTS:-2}"
  --lr 1e-6 --seq-length 2048 --batch-size 64 --micro-batch-size 1 --gradient-accumulate-step 1
  --num-layers 6 --embedding-dim 6144
  --pipeline-group-size 8 --data-group-size 1
  # 1F1B holds at most pp - stage micro-batches per stage, and each layer recomputes its
  # activations in the backward: `python training/plan.py --recipe <this file>` shows the bytes.
  --activation-checkpointing layers
  --fp16 --dp-backend nccl --dp-mode allreduce --pp-mode 1f1b --profiling no-profiling
)
[ -n "${NET_IF:-}" ] && ARGS+=(--net-interface "$NET_IF")

# 8 GPUs per node; launch.py refuses clearly when fewer are visible, stops every rank when one
# dies or on Ctrl-C, and names the rank that failed.
exec "$PYTHON" "$DIR/launch.py" --device cuda --nproc "${GPUS_PER_NODE:-8}" -- \
  "$DIR/dist_clm_train.py" "${ARGS[@]}" "$@"
