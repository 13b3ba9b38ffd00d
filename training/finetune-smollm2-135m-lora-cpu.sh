#!/usr/bin/env bash
# CPU demo of LoRA: the embedded SmolLM2-135M-Instruct, frozen, with rank-16 adapters on its
# attention projections, trained with 2 pipeline stages on gloo on the bundled OIG sample; then
# the adapter is exported in PEFT's format and the bot chats with base + adapter. No GPU, no
# network; it ends with the evaluation of base vs adapted. `make demo-lora` runs this script.
#
#   bash training/finetune-smollm2-135m-lora-cpu.sh
#   python inference/bot.py --adapter adapters/SmolLM2-135M-OIG-lora
#
# Environment: FINETUNE_TOTAL_STEPS (default 40), FINETUNE_CHECKPOINT_STEPS (default 20),
# FINETUNE_CHECKPOINT_PATH (default model_ckpts/smollm2-135m-oig-lora), ADAPTER_OUTPUT (default
# adapters/SmolLM2-135M-OIG-lora), DEMO_EVAL_LIMIT (100), DEMO_EVAL_OUTPUT, PYTHON. A rerun resumes from the newest checkpoint.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

BASE_MODEL="$ROOT/pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct"
CKPT="${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/smollm2-135m-oig-lora}"
OUT="${ADAPTER_OUTPUT:-$ROOT/adapters/SmolLM2-135M-OIG-lora}"

echo "== 1/4 prepare the embedded model as layer-sharded files" >&2
"$PYTHON" "$ROOT/pretrained/SmolLM2-135M-Instruct/prepare.py"

echo "== 2/4 LoRA r=16 on q/k/v/o: 2 pipeline stages x 1 replica on gloo" >&2
"$PYTHON" "$DIR/launch.py" --device cpu --nproc 2 -- "$DIR/dist_clm_train.py" \
  --model-name "$BASE_MODEL" --model-type llama \
  --task-name "$ROOT/data/OIG-sample/train.jsonl" \
  --evaluation-data "$ROOT/data/OIG-sample/valid.jsonl" \
  --evaluation-steps "${FINETUNE_CHECKPOINT_STEPS:-20}" --evaluation-num-batches 2 \
  --checkpoint-path "$CKPT" \
  --total-steps "${FINETUNE_TOTAL_STEPS:-40}" --warmup-steps 2 \
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-20}" --num-checkpoints 1 \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 \
  --lr 2e-4 --seq-length 128 --batch-size 4 --micro-batch-size 1 \
  --pipeline-group-size 2 --data-group-size 1 --pp-mode gpipe \
  --device cpu --dp-backend gloo --optimizer adam --seed 42 "$@"

echo "== 3/4 export the adapter in PEFT's format" >&2
"$PYTHON" "$ROOT/tools/export_lora.py" --ckpt-path "$CKPT" --save-path "$OUT" --overwrite

echo "== 4/4 evaluate base vs adapted: perplexity on the held-out sample + arc_easy (limit ${DEMO_EVAL_LIMIT:-100})" >&2
# The base (the embedded model, layer-sharded) against the LoRA checkpoint (base + adapters,
# applied in memory), so the deltas read adapted - base; the table is printed and written to
# eval_results/lora-before-after/report.md.
"$PYTHON" "$ROOT/evaluation/eval.py" --model "$BASE_MODEL" --compare "$CKPT" \
  --tasks perplexity,arc_easy --limit "${DEMO_EVAL_LIMIT:-100}" --batch-size 8 --dtype float32 \
  --data "$ROOT/data/OIG-sample/valid.jsonl" --output "${DEMO_EVAL_OUTPUT:-$ROOT/eval_results/lora-before-after}" --overwrite

echo "adapter:        $OUT" >&2
echo "chat with it:   python inference/bot.py --adapter $OUT" >&2
echo "merge it:       python tools/convert_to_hf.py --ckpt-path $CKPT --merge-lora --save-path huggingface_models/SmolLM2-135M-OIG-lora" >&2
