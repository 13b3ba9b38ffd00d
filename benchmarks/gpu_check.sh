#!/usr/bin/env bash
# The GPU paths on one lent GPU (H100 80 GB or H200 141 GB; Python 3.12, torch 2.11+cu130,
# transformers 5.17, peft; no registry, no loguru, no bitsandbytes), as two calls of at most
# 8 minutes each, back to back. Nothing is downloaded there: random-init models from real
# configs, and the missing pure-Python/bitsandbytes wheels carried in .whl/.
#
#   make gpu-wheels                                  # here, with a registry: .whl/ (~44 MB)
#   # on the device tool, carry [".whl"], one call each, the second right after the first:
#   OUT_DIR=$OUT PARTS=A bash benchmarks/gpu_check.sh    # parts 1 2   (bot; 1.4B step, MFU)
#   OUT_DIR=$OUT PARTS=B bash benchmarks/gpu_check.sh    # parts 3 4 5 (vs HF; LoRA; QLoRA)
#   PARTS="2 4" bash benchmarks/gpu_check.sh             # any parts; OUT_DIR ./gpu_check_out
#
# Parts:
#   1. the bot on CUDA: bf16, then --load-in-8bit (bitsandbytes), on a random-init
#      SmolLM2-135M-shaped Llama with a small BPE tokenizer trained on the spot;
#   2. a pp=1 bf16 step loop of a 1.4B GPT-NeoX, with activation checkpointing and without:
#      tokens/s, MFU both ways, allocator peak / reserved / card-used memory against the
#      planner (benchmarks/gpu_step_check.py);
#   3. benchmarks/bench_train_mfu.py: our engine against a plain HF bf16 loop;
#   4. the 3B LoRA recipe's step (RedPajama-INCITE-3B shape, fp16, r=16 on query_key_value,
#      micro-batch 1 x 4, seq 2048): measured peak against the planner and the original's ~14 GB;
#   5. the same as QLoRA (NF4 base, paged 8-bit AdamW), and 5b: paged 8-bit AdamW state comes
#      back paged after a resume by name.
# Only pp=1 runs (one GPU): NCCL, receive buffers and 1F1B are not exercised here.
#
# Every run has a timeout, and the call as a whole stops starting parts once 460 s have passed
# (BUDGET_S), so a call returns within 8 minutes with its log under $OUT_DIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT_DIR:-gpu_check_out}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-460}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
WORK="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
step() { echo "== $*" | tee -a "$LOG"; }

# 1) The carried wheels, installed without an index and without dependencies into /tmp/site,
#    ahead of the machine's own packages on PYTHONPATH (never over its torch).
#    A warm machine's second call finds them installed (same wheel names) and skips this.
if compgen -G ".whl/*.whl" >/dev/null; then
  if [[ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$(ls .whl)" ]] && ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    echo "gpu_check: installing .whl/*.whl failed (see $LOG)" | tee -a "$LOG"
    exit 1
  fi
  ls .whl >/tmp/site/.wheels
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# 2) Every import the parts need, checked at once: one line naming what is missing.
if ! "$PY" - >>"$LOG" 2>&1 <<'PYEOF'
import importlib, sys
need = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "loguru",
        "bitsandbytes", "numpy", "openchatkit.cli", "openchatkit.models.loading",
        "openchatkit.models.quantize", "openchatkit.training.engine",
        "openchatkit.training.memory", "openchatkit.training.metrics"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, or a library that fails to load (CUDA mismatch)
        missing.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
if missing:
    print("gpu_check: cannot import " + "; ".join(missing)
          + " -- run `make gpu-wheels` and carry .whl/", file=sys.stderr)
    sys.exit(1)
PYEOF
then
  tail -n 1 "$LOG"
  exit 1
fi

PARTS="${PARTS:-A}"
case "$PARTS" in A) PARTS="1 2" ;; B) PARTS="3 4 5" ;; all) PARTS="1 2 3 4 5" ;; esac
PARTS=" ${PARTS//,/ } "
want() { [[ "$PARTS" == *" $1 "* ]]; }
# run CAP CMD...: at most CAP seconds, and never past the call's budget.
run() {
  local left=$((BUDGET_S - SECONDS))
  local cap=$(( $1 < left ? $1 : left ))
  if (( cap < 10 )); then echo "skipped: the call's ${BUDGET_S} s budget is spent" | tee -a "$LOG"; return; fi
  timeout "$cap" "${@:2}" 2>&1 | tee -a "$LOG"; echo "exit ${PIPESTATUS[0]} (${SECONDS} s)" | tee -a "$LOG"
}

step "machine (parts:$PARTS)"
run 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run 30 "$PY" - <<'PYEOF'
import importlib.metadata as md, torch
vers = {p: md.version(p) for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes",
                                   "safetensors", "tokenizers", "loguru")}
print("versions", vers, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
      "capability", torch.cuda.get_device_capability())
PYEOF

if want 1; then
step "1. bot on CUDA (random-init SmolLM2-135M-shaped Llama)"
run 60 "$PY" - "$WORK/model" <<'PYEOF'
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out = sys.argv[1]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
text = ["What is the capital of France? The capital of France is Paris."] * 50
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
fast.save_pretrained(out)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  tie_word_embeddings=True)
LlamaForCausalLM(cfg).save_pretrained(out)
print("model at", out)
PYEOF
for flags in "--dtype bfloat16" "--load-in-8bit" "--load-in-8bit -g 0:0.1 -r 4"; do
  step "bot $flags"
  # shellcheck disable=SC2086
  run 75 "$PY" inference/bot.py --model "$WORK/model" --device cuda $flags --no-sample \
    --prompt "What is the capital of France?" --max-tokens 32 --no-stream
done
fi

if want 2; then
for ckpt in layers none; do
  step "2. pp=1 bf16 step loop, 1.4B GPT-NeoX, activation checkpointing $ckpt: planner vs measured, MFU"
  run 110 "$PY" benchmarks/gpu_step_check.py --activation-checkpointing "$ckpt" --steps 4 \
    --json "$OUT_DIR/gpu_step_check_$ckpt.json"
done
fi

if want 3; then
step "3. bench_train_mfu.py (ours vs plain HF bf16, no checkpointing)"
run 200 "$PY" benchmarks/bench_train_mfu.py --rounds 2 --steps 3
fi

LORA3B=(--config redpajama-3b --precision fp16 --lora-r 16 --micro-batch-size 1 --num-microbatches 4 --steps 4)
if want 4; then
step "4. 3B LoRA recipe step (fp16, r=16): planner vs measured vs the original's ~14 GB"
run 110 "$PY" benchmarks/gpu_step_check.py "${LORA3B[@]}" --json "$OUT_DIR/gpu_lora_3b.json"
fi

if want 5; then
step "5. the same as QLoRA (NF4 base, paged 8-bit AdamW)"
run 110 "$PY" benchmarks/gpu_step_check.py "${LORA3B[@]}" --load-in-4bit \
  --optimizer paged-8bit-adam --json "$OUT_DIR/gpu_qlora_3b.json"
step "5b. paged 8-bit AdamW state saved by name and resumed: paged again, same next step"
run 40 "$PY" - <<'PYEOF'
import torch
from openchatkit.training.optim import (build_optimizer, load_optimizer_state_by_name,
                                        optimizer_state_by_name)
torch.manual_seed(0)
init = torch.randn(512, 512, device="cuda")  # 262k elements: above bnb's 1e5 paging size
grads = [torch.randn(512, 512, device="cuda") for _ in range(3)]
w = torch.nn.Parameter(init.clone())
opt = build_optimizer([w], "paged-8bit-adam", 1e-2, 0.0)
for g in grads[:2]:
    w.grad = g.clone(); opt.step()
saved = optimizer_state_by_name(opt, ["w"], skip=set())
w2 = torch.nn.Parameter(w.detach().clone())
opt2 = build_optimizer([w2], "paged-8bit-adam", 1e-2, 0.0)
assert load_optimizer_state_by_name(opt2, ["w"], saved, {}) == []
paged = all(getattr(opt2.state[w2][k], "is_paged", False) for k in ("state1", "state2"))
for p, o in ((w, opt), (w2, opt2)):
    p.grad = grads[2].clone(); o.step()
torch.cuda.synchronize()
print("type", type(opt2).__name__, "state paged after resume:", paged,
      "| step 3 equal:", torch.equal(w, w2))
PYEOF
fi

rm -rf "$WORK"
step "done in ${SECONDS} s: $LOG"
