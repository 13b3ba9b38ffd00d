"""HF -> per-layer conversion, ours against upstream OpenChatKit's way, in one run: wall time and
peak resident memory of each, measured in a fresh child process.

- ours: `convert_hf_to_sharded`, tensor by tensor from the HF safetensors (`safe_open`), one
  safetensors file per layer.
- peer (upstream `pretrained/*/prepare.py`): `AutoModelForCausalLM.from_pretrained` of the whole
  model, then `torch.save` of each layer's state dict into `pytorch_<i>.pt`.

Peak memory is what tells them apart: upstream needs the whole model in RAM (41 GB for
GPT-NeoX-20B in fp16); ours about one layer.

    python benchmarks/bench_model_convert.py                       # the embedded SmolLM2-135M
    python benchmarks/bench_model_convert.py --model-name path/to/hf_folder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

# Both children import the same modules before the clock starts, so the figures are the work.
IMPORTS = """
import json, os, resource, sys, time
import torch, transformers, safetensors
from transformers import AutoConfig, AutoModelForCausalLM
from openchatkit.models import convert, registry
for name in registry.architecture_names(): registry.get_architecture(name)
"""

OURS = (
    IMPORTS
    + """
from openchatkit.models.convert import convert_hf_to_sharded
t = time.perf_counter()
convert_hf_to_sharded(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"s": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
)

PEER = (
    IMPORTS
    + """
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
os.makedirs(sys.argv[2])
base = model.base_model
layers = getattr(base, "layers", None) or getattr(base, "h")
for i, layer in enumerate(layers):
    torch.save(layer.state_dict(), os.path.join(sys.argv[2], f"pytorch_{i}.pt"))
torch.save(base.get_input_embeddings().state_dict(), os.path.join(sys.argv[2], "pytorch_embs.pt"))
torch.save(model.get_output_embeddings().state_dict(), os.path.join(sys.argv[2], "pytorch_lm_head.pt"))
print(json.dumps({"s": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
)

BASELINE = (
    IMPORTS
    + """
print(json.dumps({"s": 0.0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-name", default="embedded", help="HF folder (default: embedded SmolLM2)")
    args = p.parse_args(argv)

    from openchatkit.models.pretrained import resolve_hf_source
    from openchatkit.models.registry import name_for_model_type, read_model_type

    source = resolve_hf_source(args.model_name)
    arch = name_for_model_type(read_model_type(source))
    size_mb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e6
    work = tempfile.mkdtemp(prefix="bench-convert-")

    def child(code: str, out: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(source), f"{work}/{out}", arch],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    base = child(BASELINE, "none")
    ours = child(OURS, "ours")
    peer = child(PEER, "peer")
    print(
        f"model {source.name}: {size_mb:.0f} MB of safetensors; imports alone take "
        f"{base['rss_mb']:.0f} MB RSS"
    )
    print("| method | seconds | peak RSS MB | RSS above imports MB |")
    print("|---|---|---|---|")
    for name, r in (
        ("ours: tensor by tensor -> layer safetensors", ours),
        ("peer: from_pretrained + torch.save per layer", peer),
    ):
        print(f"| {name} | {r['s']:.2f} | {r['rss_mb']:.0f} | {r['rss_mb'] - base['rss_mb']:.0f} |")
    print(
        f"ratio peer/ours: time {peer['s'] / ours['s']:.2f}x, memory above imports "
        f"{(peer['rss_mb'] - base['rss_mb']) / max(ours['rss_mb'] - base['rss_mb'], 1):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
