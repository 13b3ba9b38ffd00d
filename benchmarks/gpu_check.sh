#!/usr/bin/env bash
# The GPU paths on one lent GPU, in under 10 minutes, nothing downloaded (random-init models from
# real configs): writes $OUT_DIR/gpu_check.log and the JSON figures that go into
# benchmarks/RESULTS.md.
#   1. the bot on CUDA: bf16, then --load-in-8bit (bitsandbytes), on a random-init
#      SmolLM2-135M-shaped Llama with a small BPE tokenizer trained on the spot;
#   2. a pp=1 bf16 step loop of a 1.4B GPT-NeoX with activation checkpointing: tokens/s, MFU,
#      measured peak memory against the planner's prediction (benchmarks/gpu_step_check.py);
#   3. benchmarks/bench_train_mfu.py: our engine against a plain HF bf16 loop;
#   4. the 3B LoRA recipe's step (RedPajama-INCITE-3B shape, fp16, r=16 on query_key_value,
#      micro-batch 1 x 4, seq 2048): measured peak against the planner and the original's ~14 GB;
#   5. the same as QLoRA: NF4 base, --optimizer paged-8bit-adam.
#
#   bash benchmarks/gpu_check.sh                   # OUT_DIR defaults to ./gpu_check_out
#   OUT_DIR=$OUT bash benchmarks/gpu_check.sh      # on the device tool's machine
#   PARTS="4 5" bash benchmarks/gpu_check.sh       # some parts only (a call is limited to 10 min)
#   (5 also checks that paged 8-bit AdamW state comes back paged after a resume by name)
#
# A machine without this project's pure-Python dependencies (loguru, peft, ...) takes them as
# wheels from .whl/ (pip download --no-deps ... -d .whl NAME==VERSION on a machine with a
# registry); they are installed into /tmp/site, never over the machine's own torch.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT_DIR:-gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
WORK="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PARTS="${PARTS:-1 2 3 4 5}"
PARTS=" ${PARTS//,/ } "
want() { [[ "$PARTS" == *" $1 "* ]]; }
step() { echo "== $*" | tee -a "$LOG"; }
run() { timeout "$1" "${@:2}" 2>&1 | tee -a "$LOG"; echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }

step "machine"
run 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run 30 "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

if want 1; then
step "1. bot on CUDA (random-init SmolLM2-135M-shaped Llama)"
run 120 "$PY" - "$WORK/model" <<'PYEOF'
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
for flags in "--dtype bfloat16" "--load-in-8bit"; do
  step "bot $flags"
  run 180 "$PY" inference/bot.py --model "$WORK/model" --device cuda $flags --no-sample \
    --prompt "What is the capital of France?" --max-tokens 64 --no-stream
done
fi

if want 2; then
step "2. pp=1 bf16 step loop, 1.4B GPT-NeoX, activation checkpointing: planner vs measured"
run 300 "$PY" benchmarks/gpu_step_check.py --json "$OUT_DIR/gpu_step_check.json"
fi

if want 3; then
step "3. bench_train_mfu.py (ours vs plain HF bf16)"
run 300 "$PY" benchmarks/bench_train_mfu.py --rounds 2 --steps 4
fi

LORA3B=(--config redpajama-3b --precision fp16 --lora-r 16 --micro-batch-size 1 --num-microbatches 4 --steps 4)
if want 4; then
step "4. 3B LoRA recipe step (fp16, r=16): planner vs measured vs the original's ~14 GB"
run 300 "$PY" benchmarks/gpu_step_check.py "${LORA3B[@]}" --json "$OUT_DIR/gpu_lora_3b.json"
fi

if want 5; then
step "5. the same as QLoRA (NF4 base, paged 8-bit AdamW)"
run 300 "$PY" benchmarks/gpu_step_check.py "${LORA3B[@]}" --load-in-4bit \
  --optimizer paged-8bit-adam --json "$OUT_DIR/gpu_qlora_3b.json"
step "5b. paged 8-bit AdamW state saved by name and resumed: paged again, same next step"
run 120 "$PY" - <<'PYEOF'
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
step "done: $LOG"
