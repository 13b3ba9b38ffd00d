#!/usr/bin/env bash
# CPU demo of the whole path: prepare the embedded SmolLM2-135M-Instruct in layer-sharded form,
# fine-tune it with 2 pipeline stages on gloo (2 processes) on the bundled OIG sample for a few
# dozen steps, convert the result to an HF folder, evaluate it, export it to GGUF (q8_0) and chat
# one turn with that file through llama.cpp. No GPU, no network.
# About 5 minutes on 2 idle cores, 10-12 on busy ones (`make demo` runs this script).
#
#   bash training/finetune-smollm2-135m-cpu.sh
#   python inference/bot.py --model huggingface_models/SmolLM2-135M-OIG-demo
#
# Environment: FINETUNE_TOTAL_STEPS (default 40), FINETUNE_CHECKPOINT_STEPS (default 20),
# FINETUNE_CHECKPOINT_PATH (default model_ckpts/smollm2-135m-oig-demo), DEMO_OUTPUT (the HF
# folder, default huggingface_models/SmolLM2-135M-OIG-demo), DEMO_EVAL_LIMIT (documents per task
# of the before/after evaluation, default 100), DEMO_EVAL_OUTPUT (its folder, default
# eval_results/demo-before-after), DEMO_GGUF (the GGUF file, default
# gguf/SmolLM2-135M-OIG-demo.q8_0.gguf, with its Ollama .Modelfile beside it), PYTHON.
# A rerun resumes from the newest checkpoint (and does no training once it is complete).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

BASE_MODEL="$ROOT/pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct"
CKPT="${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/smollm2-135m-oig-demo}"
OUT="${DEMO_OUTPUT:-$ROOT/huggingface_models/SmolLM2-135M-OIG-demo}"

echo "== 1/5 prepare the embedded model as layer-sharded files" >&2
"$PYTHON" "$ROOT/pretrained/SmolLM2-135M-Instruct/prepare.py"

echo "== 2/5 fine-tune: 2 pipeline stages x 1 replica on gloo" >&2
"$PYTHON" "$DIR/launch.py" --device cpu --nproc 2 -- "$DIR/dist_clm_train.py" \
  --model-name "$BASE_MODEL" --model-type llama --load-pretrained-model true \
  --task-name "$ROOT/data/OIG-sample/train.jsonl" \
  --evaluation-data "$ROOT/data/OIG-sample/valid.jsonl" \
  --evaluation-steps "${FINETUNE_CHECKPOINT_STEPS:-20}" --evaluation-num-batches 2 \
  --checkpoint-path "$CKPT" \
  --total-steps "${FINETUNE_TOTAL_STEPS:-40}" --warmup-steps 2 \
  --checkpoint-steps "${FINETUNE_CHECKPOINT_STEPS:-20}" --num-checkpoints 1 \
  --lr 2e-5 --seq-length 128 --batch-size 4 --micro-batch-size 1 \
  --pipeline-group-size 2 --data-group-size 1 --pp-mode gpipe \
  --device cpu --dp-backend gloo --optimizer adam --seed 42 "$@"

echo "== 3/5 convert the newest checkpoint to an HF folder" >&2
"$PYTHON" "$ROOT/tools/convert_to_hf.py" --ckpt-path "$CKPT" --save-path "$OUT" \
  --chat-format openchatkit --overwrite

echo "== 4/5 evaluate before/after: perplexity on the held-out sample + arc_easy (limit ${DEMO_EVAL_LIMIT:-100})" >&2
# The base model straight from its layer-sharded folder (converted in memory) vs the fine-tuned
# HF folder; the table is printed and written to eval_results/demo-before-after/report.md.
"$PYTHON" "$ROOT/evaluation/eval.py" --model "$BASE_MODEL" --compare "$OUT" \
  --tasks perplexity,arc_easy --limit "${DEMO_EVAL_LIMIT:-100}" --batch-size 8 \
  --data "$ROOT/data/OIG-sample/valid.jsonl" --output "${DEMO_EVAL_OUTPUT:-$ROOT/eval_results/demo-before-after}" --overwrite

echo "== 5/5 export to GGUF (q8_0) and chat one turn through llama.cpp" >&2
GGUF="${DEMO_GGUF:-$ROOT/gguf/$(basename "$OUT").q8_0.gguf}"
mkdir -p "$(dirname "$GGUF")"
"$PYTHON" "$ROOT/tools/export_gguf.py" --model "$OUT" --out "$GGUF" --outtype q8_0 --overwrite
"$PYTHON" "$ROOT/inference/bot.py" --model "$GGUF" --backend llama.cpp --no-sample \
  --max-tokens 48 --prompt "What is the capital of France?"

echo "fine-tuned model: $OUT" >&2
echo "chat with it:     python inference/bot.py --model $OUT" >&2
echo "or through llama.cpp: python inference/bot.py --model $GGUF (Ollama: ${GGUF%.gguf}.Modelfile)" >&2
