#!/usr/bin/env bash
# CPU demo: fine-tune the embedded SmolLM2-135M-Instruct into a moderation classifier in the
# GPT-JT-Moderation format on the bundled labelled sample (train.jsonl), then report with
# `inference/moderate.py --eval` the fine-tuned model's accuracy and the bot policy's figures
# (recall of `needs intervention`, casual messages refused) on the held-out intent families
# (valid.jsonl, with a threshold sweep) and on the hand-written check set (check.jsonl), and the
# base model's on the check set. No GPU, no network; goal under 10 minutes on 2 cores
# (`make demo-moderation-lm`; `make demo-moderation` is the encoder recipe,
# train-moderation-classifier-cpu.sh).
#
#   bash training/finetune-moderation-smollm2-cpu.sh
#   python inference/moderate.py --model huggingface_models/SmolLM2-135M-moderation-demo "I hate Mondays"
#   python inference/bot.py --moderation huggingface_models/SmolLM2-135M-moderation-demo
#
# The data goes in as `data/moderation-sample/train.jsonl:moderation` (the moderation packer:
# header, then examples until --seq-length) with `--loss-on bot` (only the labels are learned).
# Environment: FINETUNE_TOTAL_STEPS (default 40), FINETUNE_CHECKPOINT_PATH (default
# model_ckpts/smollm2-135m-moderation-demo), DEMO_OUTPUT (the HF folder, default
# huggingface_models/SmolLM2-135M-moderation-demo), PYTHON. Extra arguments go to the trainer.
# A rerun resumes from the newest checkpoint (and does no training once it is complete).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

BASE_MODEL="$ROOT/pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct"
CKPT="${FINETUNE_CHECKPOINT_PATH:-$ROOT/model_ckpts/smollm2-135m-moderation-demo}"
OUT="${DEMO_OUTPUT:-$ROOT/huggingface_models/SmolLM2-135M-moderation-demo}"
STEPS="${FINETUNE_TOTAL_STEPS:-40}"
DATA="$ROOT/data/moderation-sample"

echo "== 1/4 prepare the embedded model as layer-sharded files" >&2
"$PYTHON" "$ROOT/pretrained/SmolLM2-135M-Instruct/prepare.py"

echo "== 2/4 fine-tune on $DATA/train.jsonl (moderation format, loss on the labels)" >&2
"$PYTHON" "$DIR/launch.py" --device cpu --nproc 1 -- "$DIR/dist_clm_train.py" \
  --model-name "$BASE_MODEL" --model-type llama --load-pretrained-model true \
  --task-name "$DATA/train.jsonl:moderation" --loss-on bot \
  --checkpoint-path "$CKPT" \
  --total-steps "$STEPS" --warmup-steps 4 --checkpoint-steps "$STEPS" --num-checkpoints 1 \
  --lr 1e-4 --seq-length 128 --batch-size 4 --micro-batch-size 4 \
  --pipeline-group-size 1 --data-group-size 1 \
  --device cpu --dp-backend gloo --optimizer adam --seed 42 "$@"

echo "== 3/4 convert the newest checkpoint to an HF folder" >&2
"$PYTHON" "$ROOT/tools/convert_to_hf.py" --ckpt-path "$CKPT" --save-path "$OUT" --overwrite

echo "== 4/4 accuracy and the bot policy on messages the model never trained on" >&2
# valid.jsonl: the held-out intent families of the generated sample (the threshold was tuned on
# it); check.jsonl: hand-written messages from no template (never trained on or tuned on).
echo "-- fine-tuned: $OUT, held-out split $DATA/valid.jsonl (the threshold sweep tunes on this)"
"$PYTHON" "$ROOT/inference/moderate.py" --dtype float32 --model "$OUT" --eval "$DATA/valid.jsonl" \
  --sweep
echo
echo "-- fine-tuned: $OUT, hand-written check set $DATA/check.jsonl"
"$PYTHON" "$ROOT/inference/moderate.py" --dtype float32 --model "$OUT" --eval "$DATA/check.jsonl"
echo
echo "-- base: embedded SmolLM2-135M-Instruct (few-shot only), on $DATA/check.jsonl"
"$PYTHON" "$ROOT/inference/moderate.py" --dtype float32 --eval "$DATA/check.jsonl"
echo "moderation model: $OUT" >&2
echo "use it in the bot: python inference/bot.py --moderation $OUT" >&2
