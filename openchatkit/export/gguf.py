"""Export any model the kit makes to one GGUF file (llama.cpp, Ollama), with an Ollama Modelfile.

Sources: an HF folder, a layer-sharded folder, a trainer checkpoint (a LoRA checkpoint is merged
with its base), or the embedded model; `adapter` merges a PEFT adapter on top. All but an HF
folder are first turned into a temporary HF folder by the kit's own converters
(openchatkit/models/convert.py, lora.py), which stream one tensor at a time; the GGUF is then
written tensor by tensor: every tensor's header entry is computed from shapes alone, then each
tensor is read, laid out (openchatkit/export/gguf_arch.py), quantised with `gguf.quants` and
written before the next is read. Peak memory is about one tensor (the embedding matrix, for small
models the largest) above the imports, whatever the model's size.

The k-quant mixtures (`q6_k`, `q5_k_m`, `q4_k_m`: LLAMACPP_OUTTYPES) are llama.cpp's own: the f16
file is written first, beside the output, and llama.cpp's quantiser (through the binding) makes
the output from it, also tensor by tensor.

The file is written under a temporary name beside the output and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from openchatkit.errors import UserError
from openchatkit.export.gguf_arch import GGUFArch, gguf_arch_for
from openchatkit.export.gguf_vocab import add_tokenizer, check_tokenizer_kind, modelfile_text
from openchatkit.fileio import (
    OutputError,
    apply_umask,
    check_writable_dir,
    describe_os_error,
    remove_stale_temps,
    temp_prefix,
)

if TYPE_CHECKING:
    import torch

Q = gguf.GGMLQuantizationType
# --outtype -> (type of 2-D weights, llama.cpp's file type).
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
# --outtype -> llama.cpp's own file type (LLAMA_FTYPE_MOSTLY_*): the k-quant mixtures people run
# in llama.cpp and Ollama (Q4_K_M is what Ollama's library and Unsloth's save_pretrained_gguf
# default to). `gguf.quants` has no k-quant quantiser, so these are made from an f16 export by
# llama.cpp's quantiser through the binding (`make install`). f16, not bf16, as the source: it keeps
# the small weight changes of a short fine-tune (benchmarks/RESULTS.md: the demo model's perplexity
# +0.07 % in f16, +6.9 % in bf16).
LLAMACPP_OUTTYPES = {"q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M"}
# With 4-bit weights the embedding and output matrices stay 8-bit: they hold most of a small
# model's error budget (llama.cpp's quantize keeps them higher too).
KEEP_8BIT = ("token_embd.weight", "output.weight")


def modelfile_path(out: Path) -> Path:
    """The Ollama Modelfile beside `out`: model.gguf -> model.Modelfile (one per export, so
    several exports can share a folder)."""
    return out.with_suffix(".Modelfile")


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor: 1-D tensors (norms, biases) stay F32 as llama.cpp expects;
    2-D weights take --outtype, falling back to F16 when a row is not whole blocks."""
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2:
        return Q.F32
    if qtype in (Q.Q4_0, Q.Q4_1) and name in KEEP_8BIT:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def encode(w: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor's bytes in GGML type `qtype` (numpy array ready for the writer)."""
    import torch  # here, not at the top: a bad --model or --out is refused without it

    data = w.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def nbytes_of(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def shape_of(weights, key: str) -> tuple[int, ...]:
    """A tensor's shape without reading it (safetensors header; a .bin shard is mapped)."""
    from openchatkit.models.hf_weights import SafetensorsFile

    handle = weights._open(weights._file_of[key])
    if isinstance(handle, SafetensorsFile):
        return tuple(handle.shape(key))
    return tuple(handle.get_tensor(key).shape)


@dataclass
class Planned:
    gguf_name: str
    hf_key: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def plan_tensors(weights, config, spec: GGUFArch, outtype: str) -> list[Planned]:
    """Every exported tensor, named and typed, from the HF keys and shapes alone."""
    from openchatkit.models.arch import is_tied

    names = gguf.get_tensor_name_map(spec.arch, int(config.num_hidden_layers))
    tied = is_tied(config)
    plan, seen = [], set()
    embed_key = None
    for key in weights.keys():
        if spec.is_ignored(key):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {key!r} has no GGUF name for the {spec.name} graph")
        if name == "output.weight" and tied:
            continue  # the same matrix as the embedding; llama.cpp reuses token_embd
        if name == "token_embd.weight":
            embed_key = key
        shape = shape_of(weights, key)
        plan.append(Planned(name, key, shape, tensor_type(name, shape, outtype)))
        seen.add(name)
    if spec.output_required and "output.weight" not in seen and embed_key is not None:
        shape = shape_of(weights, embed_key)
        plan.append(
            Planned("output.weight", embed_key, shape, tensor_type("output.weight", shape, outtype))
        )
    return plan


def write_gguf(
    hf_dir: Path, out: Path, outtype: str, name: str | None = None, into: Path | None = None
) -> str:
    """Write the HF folder `hf_dir` as GGUF file `out` (replacing it); returns the chat template
    written. Raises UserError for what cannot be exported. `into`: write into that file instead
    (a temporary name the caller made and removes) and rename nothing; errors still name `out`."""
    from transformers import AutoTokenizer

    from openchatkit.models.convert import _load_config
    from openchatkit.models.hf_weights import HFWeights
    from openchatkit.models.loading import quiet_transformers
    from openchatkit.models.registry import read_model_type

    spec = gguf_arch_for(read_model_type(hf_dir), f"--model {hf_dir}")
    check_tokenizer_kind(hf_dir)
    config = _load_config(hf_dir)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    weights = HFWeights(hf_dir)
    plan = plan_tensors(weights, config, spec, outtype)

    tmp = into
    try:
        if tmp is None:
            fd, name_of_tmp = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
            os.close(fd)
            tmp = Path(name_of_tmp)
        writer = gguf.GGUFWriter(tmp, spec.name)
        try:
            writer.add_name(name or hf_dir.name)
            writer.add_type(gguf.GGUFType.MODEL)
            for key, value in spec.hparams(config):
                getattr(writer, f"add_{key}")(value)
            writer.add_vocab_size(int(config.vocab_size))
            writer.add_file_type(OUTTYPES[outtype][1])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            template = add_tokenizer(writer, hf_dir, tokenizer, int(config.vocab_size))
            for t in plan:
                writer.add_tensor_info(
                    t.gguf_name, t.shape, np.dtype(np.float32), nbytes_of(t.shape, t.qtype), t.qtype
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:  # one tensor in memory at a time
                w = spec.transform(t.hf_key, weights.get(t.hf_key), config)
                writer.write_tensor_data(encode(w, t.qtype))
                del w
        finally:
            writer.close()
        if into is None:
            apply_umask(tmp)  # mkstemp makes it 0600; the user's umask decides, as for any file
            os.replace(tmp, out)
    except BaseException as err:
        if into is None and tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {out}: {describe_os_error(err)}") from None
        raise
    return template


def write_llamacpp_quant(hf_dir: Path, out: Path, outtype: str, name: str) -> str:
    """Write `hf_dir` as GGUF `out` in one of LLAMACPP_OUTTYPES: an f16 export beside the output
    (disk: about 2 bytes per parameter more, for the length of the call), quantised by llama.cpp
    in a child process (openchatkit/export/gguf_quantize.py: Ctrl-C stops it) into a temporary
    name, renamed when complete. Both temporary files are removed whatever happens; a killed
    export's are removed by the next one (`remove_stale_temps`). Returns the chat template."""
    from openchatkit.export.gguf_quantize import quantize_gguf

    temps: list[Path] = []
    try:
        for suffix in (".f16", ""):
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out), suffix=suffix, dir=out.parent)
            os.close(fd)
            temps.append(Path(tmp))
        f16, tmp = temps
        template = write_gguf(hf_dir, out, "f16", name=name, into=f16)
        try:
            quantize_gguf(f16, tmp, LLAMACPP_OUTTYPES[outtype])
        except RuntimeError as err:
            # llama.cpp reports a full disk as "basic_ios::clear: iostream error": look.
            if shutil.disk_usage(out.parent).free < 16 << 20:
                raise OutputError(
                    f"cannot write {out}: no space left on its device ({err})"
                ) from None
            raise OutputError(f"cannot write {out}: {err}") from None
        apply_umask(tmp)
        os.replace(tmp, out)
    except OSError as err:  # making the temporary names, the rename
        raise OutputError(f"cannot write {out}: {describe_os_error(err)}") from None
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    return template


def weight_types(path: Path) -> dict[str, int]:
    """How many 2-D tensors of the GGUF file `path` have each type, most first ({"Q8_0": 181,
    "Q6_K": 30}): llama.cpp's quantiser gives a k-quant only to tensors whose rows are whole
    256-weight blocks, and falls back to a legacy type (q5_0, q5_1, q8_0) for the others."""
    from collections import Counter

    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)
    return dict(types.most_common())


# ---- sources ----------------------------------------------------------------------------------


def check_output(out: Path, overwrite: bool) -> None:
    """Before any work: the output (and its Modelfile) is new or --overwrite, and writable."""
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: give a file name ending in .gguf")
    for path in (out, modelfile_path(out)):
        if path.is_dir():
            raise UserError(f"--out {path} is a folder")
        if path.exists() and not overwrite:
            raise UserError(f"--out {path} exists; add --overwrite to replace it")
    check_writable_dir(out.parent, "--out")


def _is_sharded_or_checkpoint(path: Path) -> bool:
    return (
        (path / "manifest.json").is_file()
        or (path / "meta.json").is_file()
        or (path / "latest").exists()
        or any(path.glob("checkpoint_*/meta.json"))
        or (path / "adapter.json").is_file()
    )


@contextlib.contextmanager
def hf_source(model: str | None, adapter: str | None, work_parent: Path) -> Iterator[Path]:
    """An HF folder holding `model` (+ `adapter` merged): the folder itself, or one made in a
    temporary folder under `work_parent`, removed afterwards. Architectures are checked before
    anything is converted."""
    from openchatkit.models.embedded import is_embedded_name

    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"--adapter {adapter}: no such folder")
    if is_embedded_name(model):
        from openchatkit.models.embedded import ensure_embedded_model

        base, convert = ensure_embedded_model(), None
    else:
        assert model is not None
        path = Path(model).expanduser()
        if not path.exists():
            raise UserError(f"--model {model}: no such folder")
        if path.is_file():
            what = "already a GGUF file" if path.suffix == ".gguf" else "a file, not a folder"
            raise UserError(f"--model {model} is {what}")
        if _is_sharded_or_checkpoint(path):
            base, convert = None, _plan_checkpoint(path, model)
        elif (path / "config.json").is_file():
            from openchatkit.models.registry import read_model_type

            gguf_arch_for(read_model_type(path), f"--model {model}")
            base, convert = path, None
        else:
            raise UserError(
                f"--model {model} is neither an HF folder (config.json), a layer-sharded folder "
                "nor a trainer checkpoint"
            )
    work = Path(tempfile.mkdtemp(prefix=".export-gguf-", dir=work_parent))
    try:
        if convert is not None:
            base = convert(work)
        if adapter is not None:
            from openchatkit.models.lora import merge_into_hf

            base = merge_into_hf(base, adapter, work / "merged")
        yield base
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plan_checkpoint(path: Path, model: str):
    """Check a layer-sharded folder or trainer checkpoint (LoRA: its base) now; return the
    function that converts it to HF in a work folder."""
    from openchatkit.models.convert import (
        convert_sharded_to_hf,
        read_sharded_source,
        resolve_checkpoint,
    )
    from openchatkit.models.lora import read_adapter_meta
    from openchatkit.models.registry import MODEL_TYPES, read_model_type

    folder = resolve_checkpoint(path)
    meta = read_adapter_meta(folder)
    if meta is not None:  # LoRA: adapters only; merged with the base they were trained on
        from openchatkit.models.lora import locate_base

        base_dir = locate_base(meta, f"--model {model}")
        model_type = read_model_type(base_dir)
        gguf_arch_for(model_type, f"--model {model} (its base {base_dir})")

        def merge(work: Path) -> Path:
            from openchatkit.models.lora.merge import merge_checkpoint_to_hf

            # The converter's own merge (tools/convert_to_hf.py --merge-lora), into `work`.
            merged, _ = merge_checkpoint_to_hf(path, work / "lora-merged")
            return merged

        return merge
    _, manifest = read_sharded_source(path)
    model_type = MODEL_TYPES.get(manifest.architecture, manifest.architecture)
    gguf_arch_for(model_type, f"--model {model}")

    def convert(work: Path) -> Path:
        return convert_sharded_to_hf(path, work / "hf", manifest.architecture)

    return convert


def export_gguf(
    model: str | None,
    out: str | os.PathLike,
    outtype: str = "f16",
    adapter: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export `model` (see the module doc) to GGUF file `out` and its Modelfile; returns `out`."""
    out = Path(out).expanduser()
    if outtype not in OUTTYPES and outtype not in LLAMACPP_OUTTYPES:
        choices = ", ".join([*OUTTYPES, *LLAMACPP_OUTTYPES])
        raise UserError(f"--outtype {outtype!r}: use one of {choices}")
    check_output(out, overwrite)
    if outtype in LLAMACPP_OUTTYPES:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(
                f"--outtype {outtype} is made by llama.cpp's own quantiser: install the llama.cpp "
                "binding (`make install`), or use one of " + ", ".join(OUTTYPES)
            )
        from openchatkit.inference.llamacpp import load_binding

        load_binding()  # a binding that does not load is refused now, not after the f16 export
    remove_stale_temps(out)  # what a killed export left beside the output
    with hf_source(model, adapter, out.parent) as hf_dir:
        from openchatkit.models.embedded import EMBEDDED_MODEL_NAME, is_embedded_name

        name = EMBEDDED_MODEL_NAME if is_embedded_name(model) else Path(str(model)).name
        if outtype in LLAMACPP_OUTTYPES:
            template = write_llamacpp_quant(hf_dir, out, outtype, name)
        else:
            template = write_gguf(hf_dir, out, outtype, name=name)
    from openchatkit.fileio import atomic_file

    with atomic_file(modelfile_path(out)) as f:
        f.write(modelfile_text(out.name, template))
    return out
