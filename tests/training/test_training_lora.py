"""LoRA through the trainer's CLI: adapter-only checkpoints, exact resume, export to PEFT (loaded
by peft on the HF base), merge, the bot's --adapter, and the bad inputs.

Layout parity (pp x dp against one process, base weights bit-identical, first loss equal to the
base model's) is in test_training_engine.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

LORA = dict(lora_r=4, lora_dropout=0.0)


@pytest.fixture(scope="module")
def lora_run(tiny, tt, tmp_path_factory):
    """A 4-step LoRA run of the tiny tied Llama (checkpoints at 2 and 4), run as a user runs
    it, and its HF base (convert_to_hf_llama.py's main in this process, `tt.main_here`: its
    real process is tested in tests/models/test_models_cli.py)."""
    root = tmp_path_factory.mktemp("lora")
    ckpt = root / "ckpt"
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, **LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable (LoRA r=4)" in r.stderr
    hf = root / "hf"
    r = tt.main_here(
        "tools/convert_to_hf_llama.py", "--ckpt-path", tiny["llama"], "--save-path", hf
    )
    assert r.returncode == 0, r.stderr
    return {"ckpt": ckpt, "hf": hf, "root": root}


def _adapters(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("adapter_stage_*.safetensors")):
        out.update(load_file(f))
    return out


def test_checkpoint_holds_only_adapters_and_resumes_exactly(
    tiny, tt, lora_run, tmp_path, train_here
):
    final = lora_run["ckpt"] / "checkpoint_4"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_stage_0.safetensors", "adapter.json", "meta.json"} <= names
    assert not any(n.startswith(("layer_", "embeddings", "head")) for n in names)
    adapters = _adapters(final)
    assert adapters and all(".lora_" in k for k in adapters)
    base_bytes = sum(f.stat().st_size for f in tiny["llama"].glob("*.safetensors"))
    assert (final / "adapter_stage_0.safetensors").stat().st_size < base_bytes / 5
    # Stop after 2 steps, resume to 4: the same adapters bit for bit (in this process; the
    # resume by a real process is the pp=2 -> one process run below).
    ckpt = tmp_path / "resumed"
    r = train_here(tt.train_args(tiny, "llama", ckpt, stop_after_steps=2, **LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_here(tt.train_args(tiny, "llama", ckpt, **LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    resumed = _adapters(ckpt / "checkpoint_4")
    assert resumed.keys() == adapters.keys()
    for k in adapters:
        assert torch.equal(resumed[k], adapters[k]), k
    assert tt.train_losses(ckpt) == tt.train_losses(lora_run["ckpt"])


def test_resume_under_another_layout_and_with_dropout(tiny, tt, lora_run, tmp_path, train_here):
    """Stop a pp=2 run after 2 steps, resume it in one process: the straight one-process run's
    losses and adapters (within float rounding of the layouts). With dropout on, a stopped and
    resumed run equals the straight run bit for bit (the dropout RNG state is restored). The
    layout change runs as a user runs it (launch.py, then the script); the dropout runs call
    the trainer's main in this process (`train_here`)."""
    ckpt = tmp_path / "pp2-then-pp1"
    pp2 = dict(LORA, pipeline_group_size=2, stop_after_steps=2)
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, **pp2), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, **LORA))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    straight = tt.train_losses(lora_run["ckpt"])
    assert tt.train_losses(ckpt) == pytest.approx(straight, rel=1e-5)
    a, b = _adapters(lora_run["ckpt"] / "checkpoint_4"), _adapters(ckpt / "checkpoint_4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    drop = dict(LORA, lora_dropout=0.1)
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        for stop in stops:
            args = tt.train_args(tiny, "llama", tmp_path / name, stop_after_steps=stop, **drop)
            r = train_here(args)
            assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tt.train_losses(tmp_path / name)
    assert runs["resumed"] == runs["straight"]
    assert runs["straight"] != straight  # dropout really acted
    a, b = (_adapters(tmp_path / n / "checkpoint_4") for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~30 s; the same update and state switch are unit-tested (test_optimizer_state.py)
def test_paged_8bit_adam_trains_and_switches_with_8bit_adam_on_resume(tiny, tt, tmp_path):
    """QLoRA's optimizer choice, `--optimizer paged-8bit-adam`: on CPU it says in one line that
    paging needs CUDA and runs 8bit-adam, so a run stopped under 8bit-adam and resumed under
    the paged name equals the straight paged run bit for bit."""
    straight = tmp_path / "paged"
    r = tt.run_train(tt.train_args(tiny, "llama", straight, optimizer="paged-8bit-adam", **LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "paging needs CUDA" in r.stderr and "Traceback" not in r.stderr
    switched = tmp_path / "switched"
    flags = dict(LORA, optimizer="8bit-adam", stop_after_steps=2)
    r = tt.run_train(tt.train_args(tiny, "llama", switched, **flags))
    assert r.returncode == 0, r.stderr[-3000:]
    r = tt.run_train(tt.train_args(tiny, "llama", switched, optimizer="paged-8bit-adam", **LORA))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert "no saved optimizer state" not in r.stderr
    assert tt.train_losses(switched) == tt.train_losses(straight)
    a, b = (_adapters(p / "checkpoint_4") for p in (straight, switched))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~35 s; layout parity of QLoRA is in the default set (test_training_engine)
def test_qlora_on_cpu_trains_and_resumes_exactly(tiny, tt, lora_run, tmp_path):
    """--load-in-4bit on CPU (bitsandbytes' NF4 CPU path): an adapter-only checkpoint, a loss
    that differs from full-precision LoRA's (the base is quantized) and an exact resume."""
    ckpt = tmp_path / "qlora"
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, load_in_4bit=True, **LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in (ckpt / "checkpoint_4").iterdir()}
    assert "adapter_stage_0.safetensors" in names and "layer_00000.safetensors" not in names
    losses = tt.train_losses(ckpt)
    full = tt.train_losses(lora_run["ckpt"])
    assert losses.keys() == full.keys() and losses != full
    assert all(abs(losses[k] - full[k]) < 0.05 * full[k] for k in full)
    resumed = tmp_path / "qlora-resumed"
    r = tt.run_train(
        tt.train_args(tiny, "llama", resumed, load_in_4bit=True, stop_after_steps=2, **LORA)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = tt.run_train(tt.train_args(tiny, "llama", resumed, load_in_4bit=True, **LORA))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert tt.train_losses(resumed) == losses
    a, b = _adapters(ckpt / "checkpoint_4"), _adapters(resumed / "checkpoint_4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainer_logits(base, ckpt, ids):
    """Logits of our stage model with the checkpoint's adapters."""
    from openchatkit.models.lora import apply_lora, load_adapter_into, read_adapter_checkpoint
    from openchatkit.models.stage import StageModel

    stage = StageModel.from_sharded(base, range(4), True, True, dtype=torch.float32)
    _, _, settings, _ = read_adapter_checkpoint(ckpt)
    apply_lora(stage, settings)
    load_adapter_into(stage, ckpt / "checkpoint_4")
    stage.eval()
    with torch.no_grad():
        return stage(ids)


def test_export_loads_in_peft_and_merge_equals_base_plus_adapter(tiny, cli, lora_run, in_process):
    """The export runs as a user runs it; the merges and the evaluation call their scripts'
    main(argv) in this process (`in_process`): what is checked here is what they write, and
    each script runs as a real process elsewhere (convert_to_hf_llama.py in
    tests/models/test_models_cli.py, merge_lora.py and eval.py with a LoRA model in
    test_training_lora_use.py)."""
    import warnings

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = lora_run["root"] / "adapter"
    r = cli.run("tools/export_lora.py", "--ckpt-path", lora_run["ckpt"], "--save-path", adapter)
    assert r.returncode == 0, r.stderr
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = _trainer_logits(tiny["llama"], lora_run["ckpt"], ids)
    base = AutoModelForCausalLM.from_pretrained(lora_run["hf"], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert not [w for w in caught if "keys" in str(w.message).lower()]  # no missing keys
    # The file holds exactly the keys peft itself saves for this config (none ignored).
    exported = load_file(adapter / "adapter_model.safetensors")
    assert exported.keys() == get_peft_model_state_dict(peft_model).keys()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - plain).abs().max() > 1e-4  # the adapter changes the model
    # Merged (both ways) equals base + adapter.
    merged_tool = lora_run["root"] / "merged-tool"
    r = in_process(
        "tools/merge_lora.py", "--base", lora_run["hf"], "--adapter", adapter,
        "--save-path", merged_tool,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    merged_ckpt = lora_run["root"] / "merged-ckpt"
    r = in_process(
        "tools/convert_to_hf_llama.py", "--ckpt-path", lora_run["ckpt"], "--merge-lora",
        "--save-path", merged_ckpt,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for folder in (merged_tool, merged_ckpt):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, theirs, rtol=1e-5, atol=1e-5)
    # Evaluation with --adapter: base + adapter against the base, side by side.
    out = lora_run["root"] / "eval"
    r = in_process(
        "evaluation/eval.py", "--model", lora_run["hf"], "--adapter", adapter,
        "--compare", lora_run["hf"], "--tasks", "perplexity", "--data", tiny["valid"],
        "--limit", 5, "--output", out, "--device", "cpu", env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    adapted = json.loads((out / "results.json").read_text())
    base = json.loads((out / "results_2.json").read_text())
    assert adapted["model"].endswith("+ adapter adapter") and "adapter" not in base["model"]
    key = "token_perplexity"
    assert adapted["results"]["perplexity"][key] != base["results"]["perplexity"][key]
    # The bot loads base + adapter and names both.
    from openchatkit.models.loading import load_chat_model

    loaded = load_chat_model(
        str(lora_run["hf"]), device="cpu", dtype="float32", adapter=str(adapter)
    )
    assert loaded.name == f"{lora_run['hf'].name} + adapter adapter"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, theirs, rtol=1e-5, atol=1e-5)


def test_lora_bad_inputs(tiny, tt, cli, lora_run, tmp_path, in_process):
    """The inputs are made first; each case then calls its script's main(argv) in this process
    (the `in_process` fixture: through run_main, as the script's __main__ does), each trainer
    run on its own copy of the checkpoint folder (a run takes that folder's lock). The NF4 case
    needs a bitsandbytes that fails to import, so it alone runs as a subprocess, beside them."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file, save_file

    def ckpt_copy(name):
        """A fresh copy of the trained LoRA run's checkpoint folder."""
        shutil.copytree(lora_run["ckpt"], tmp_path / name)
        return tmp_path / name

    def trainer(args):
        """The trainer in a user's shell: no torchrun variables (tests/training/conftest.py)."""
        unset = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        return in_process(tt.TRAIN, *args, env={"WANDB_MODE": "offline"}, unset=unset)

    def train(name, *extra, ckpt=None, **flags):
        args = tt.train_args(tiny, "llama", ckpt or tmp_path / f"c-{name}", **flags)
        return lambda: trainer(args + list(extra))

    def tool(*args):
        return lambda: in_process(*args)

    # Where bitsandbytes cannot run NF4 (simulated: its import fails), one line.
    fake = tmp_path / "no-bnb" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no NF4 backend here')\n")
    nf4 = tt.train_args(tiny, "llama", tmp_path / "q", lora_r=4, load_in_4bit=True)
    # Another base: the same shapes, layer 0 moved.
    other = tmp_path / "other-base"
    shutil.copytree(tiny["llama"], other)
    layer = other / "layer_00000.safetensors"
    save_file({k: v + 1 for k, v in load_file(layer).items()}, layer)
    other_base = tt.train_args(tiny, "llama", ckpt_copy("resume-other"), total_steps=6, **LORA)
    other_base[other_base.index("--model-name") + 1] = str(other)
    # A checkpoint whose recorded base folder now holds other weights.
    moved = tmp_path / "moved-base"
    shutil.copytree(lora_run["ckpt"] / "checkpoint_4", moved)
    meta = json.loads((moved / "adapter.json").read_text())
    meta["base_model"] = meta["base_model_abs"] = str(other)
    (moved / "adapter.json").write_text(json.dumps(meta))
    ckpt = lora_run["ckpt"]  # read only by the tools below
    adapter = lora_run["root"] / "adapter-bad"
    deep = tmp_path / "new" / "deeper" / "out"
    neox_hf, other_hf = tmp_path / "neox-hf", tmp_path / "other-hf"
    conv_llama, conv_neox = "tools/convert_to_hf_llama.py", "tools/convert_to_hf_gptneox.py"
    jobs = {
        "r<0": train("r", lora_r=-1),
        "targets": train("t", lora_r=4, lora_target_modules="q_proj,nope"),
        "4bit-no-lora": train("4", load_in_4bit=True),
        "other-base": lambda: trainer(other_base),
        "rank": train("rank", ckpt=ckpt_copy("resume-rank"), total_steps=6, lora_r=8),
        "fewer-targets": train(
            "ft", ckpt=ckpt_copy("resume-ft"), total_steps=6, lora_r=4, lora_target_modules="q_proj"
        ),
        # Optimizer state another optimizer cannot take (AdamW's moments vs 8-bit quantized
        # ones): a KeyError at the first step before; the 8-bit and paged names may switch.
        "optimizer": train(
            "o", ckpt=ckpt_copy("resume-o"), total_steps=6, optimizer="paged-8bit-adam", **LORA
        ),
        # A full-weight run cannot take over a LoRA checkpoint folder.
        "full-on-lora": train("full", ckpt=ckpt_copy("resume-full"), total_steps=6),
        "export-moved": tool(
            "tools/export_lora.py", "--ckpt-path", moved, "--save-path", tmp_path / "e"
        ),
        "merge-moved": tool(conv_llama, "--ckpt-path", moved, "--merge-lora", "--save-path", deep),
        "merge-arch": tool(conv_neox, "--ckpt-path", ckpt, "--merge-lora", "--save-path", deep),
        "no-merge-flag": tool(conv_llama, "--ckpt-path", ckpt, "--save-path", tmp_path / "x"),
        # Inputs of the two merges below, which must work.
        "export": tool("tools/export_lora.py", "--ckpt-path", ckpt, "--save-path", adapter),
        "neox-hf": tool(conv_neox, "--ckpt-path", tiny["gpt_neox"], "--save-path", neox_hf),
        "other-hf": tool(conv_llama, "--ckpt-path", other, "--save-path", other_hf),
    }
    with ThreadPoolExecutor(1) as pool:
        nf4_run = pool.submit(tt.run_train, nf4, PYTHONPATH=str(fake.parent))
        r = {name: job() for name, job in jobs.items()}
        r["nf4"] = nf4_run.result()

    cli.assert_one_line_error(r["r<0"], "--lora-r must be >= 0")
    cli.assert_one_line_error(r["targets"], "--lora-target-modules 'nope'", "q_proj", "down_proj")
    cli.assert_one_line_error(r["nf4"], "--load-in-4bit: bitsandbytes cannot run NF4 on cpu")
    cli.assert_one_line_error(r["4bit-no-lora"], "give --lora-r")
    # Adapters trained on one base, resumed on another (same shapes, other weights).
    cli.assert_one_line_error(r["other-base"], "trained on", str(tiny["llama"]), str(other))
    # Other adapter shapes on resume: another rank, fewer target modules.
    cli.assert_one_line_error(r["rank"], "other LoRA settings", "r 4 -> 8")
    cli.assert_one_line_error(r["fewer-targets"], "other LoRA settings", "target_modules")
    cli.assert_one_line_error(r["optimizer"], "--optimizer paged-8bit-adam", "holds adam's state")
    cli.assert_one_line_error(r["full-on-lora"], "holds LoRA adapters")
    # Export and merge check the base by content, as resume does: a checkpoint whose recorded
    # base folder now holds other weights is refused, naming it.
    cli.assert_one_line_error(r["export-moved"], "trained on", str(other), "another model")
    cli.assert_one_line_error(r["merge-moved"], "another model")
    cli.assert_one_line_error(r["merge-arch"], "its base model", "is llama, not gpt_neox")
    assert not (tmp_path / "e").exists() and not (tmp_path / "new").exists()
    # A LoRA checkpoint given to a full-weight converter without --merge-lora.
    cli.assert_one_line_error(r["no-merge-flag"], "is a LoRA checkpoint", "--merge-lora")
    assert not (tmp_path / "x").exists()
    for name in ("export", "neox-hf", "other-hf"):
        assert r[name].returncode == 0, r[name].stderr
    # An adapter for another base model; then the same shapes with other weights (the copy whose
    # layer 0 moved), refused by the base sample the export wrote, naming both bases.
    assert (adapter / "openchatkit_base.json").is_file()
    wrong_arch, wrong_weights = (
        in_process(
            "tools/merge_lora.py",
            "--base",
            base,
            "--adapter",
            adapter,
            "--save-path",
            tmp_path / f"m-{base.name}",
        )
        for base in (neox_hf, other_hf)
    )
    cli.assert_one_line_error(wrong_arch, str(adapter), "does not fit")
    cli.assert_one_line_error(
        wrong_weights, "was exported for", str(tiny["llama"]), "holds other weights"
    )
    assert not any(tmp_path.glob("m-*"))
