"""Accuracy, confusion matrix and per-label precision/recall of moderation labels, and the text
report `inference/moderate.py --eval` prints."""

from __future__ import annotations

from collections.abc import Sequence

from openchatkit.moderation import LABELS


def evaluate(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Accuracy, confusion matrix (rows: true label, columns: predicted, in LABELS order) and
    per-label precision, recall and support."""
    index = {label: i for i, label in enumerate(LABELS)}
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for t, p in zip(truth, predicted, strict=True):
        confusion[index[t]][index[p]] += 1
    correct = sum(confusion[i][i] for i in range(len(LABELS)))
    per_label = {}
    for i, label in enumerate(LABELS):
        predicted_i = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        per_label[label] = {
            "precision": confusion[i][i] / predicted_i if predicted_i else 0.0,
            "recall": confusion[i][i] / support if support else 0.0,
            "support": support,
        }
    return {
        "accuracy": correct / len(truth) if truth else 0.0,
        "num_examples": len(truth),
        "labels": list(LABELS),
        "confusion": confusion,
        "per_label": per_label,
    }


def format_report(report: dict) -> str:
    """`evaluate`'s result as the text `moderate.py --eval` prints."""
    n = report["num_examples"]
    correct = sum(report["confusion"][i][i] for i in range(len(LABELS)))
    width = max(map(len, LABELS))
    lines = [f"accuracy {report['accuracy']:.3f} ({correct}/{n})", ""]
    lines.append("confusion matrix (rows: true label, columns: predicted label number)")
    lines.append(" " * (width + 4) + "".join(f"{i:>6}" for i in range(1, len(LABELS) + 1)))
    for i, (label, row) in enumerate(zip(LABELS, report["confusion"], strict=True), 1):
        lines.append(f"{i}. {label:<{width}} " + "".join(f"{c:>6}" for c in row))
    lines += ["", f"{'label':<{width + 3}} precision  recall  support"]
    for i, label in enumerate(LABELS, 1):
        m = report["per_label"][label]
        lines.append(
            f"{i}. {label:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['support']:>8}"
        )
    return "\n".join(lines)


def policy_figures(
    truth: Sequence[str], probabilities: Sequence[dict[str, float]], threshold: float | None = None
) -> dict:
    """What the bot's refusal rule (`openchatkit.moderation.refuses`) does on labelled messages:
    recall of `needs intervention` (refused / all that need it) and the share of `casual`
    messages refused, with their counts."""
    from openchatkit.moderation import INTERVENTION, INTERVENTION_THRESHOLD, refuses

    refused = [refuses(p, threshold) for p in probabilities]
    need = [r for t, r in zip(truth, refused, strict=True) if t == INTERVENTION]
    casual = [r for t, r in zip(truth, refused, strict=True) if t == "casual"]
    return {
        "threshold": INTERVENTION_THRESHOLD if threshold is None else threshold,
        "intervention_recall": sum(need) / len(need) if need else 0.0,
        "intervention_caught": sum(need),
        "intervention_total": len(need),
        "casual_refused": sum(casual) / len(casual) if casual else 0.0,
        "casual_refused_count": sum(casual),
        "casual_total": len(casual),
        "refused_total": sum(refused),
    }


def format_policy(figures: dict) -> str:
    """One line: the refusal rule's recall of `needs intervention` and casual messages refused."""
    f = figures
    return (
        f"bot policy (refuse when p(needs intervention) >= {f['threshold']:.2f}): "
        f"needs-intervention recall {f['intervention_recall']:.3f} "
        f"({f['intervention_caught']}/{f['intervention_total']}), casual refused "
        f"{f['casual_refused']:.1%} ({f['casual_refused_count']}/{f['casual_total']})"
    )
