"""Label text with a moderation model in the GPT-JT-Moderation format (five labels).

Each text is scored against the five labels (casual, needs caution, needs intervention, possibly
needs caution, probably needs caution) by log-likelihood after a few-shot prompt; nothing is
generated, so the answer is deterministic.

    python inference/moderate.py "I want to call in sick"                  # casual 0.93
    python inference/moderate.py --json "I hate my job"                    # all five probabilities
    python inference/moderate.py --input messages.jsonl > labels.jsonl     # `text` per line
    python inference/moderate.py --eval data/moderation-sample/valid.jsonl # accuracy, confusion,
                                                        # the bot policy's recall / casual refused
    python inference/moderate.py --eval data/moderation-sample/valid.jsonl --sweep  # tune it
    python inference/moderate.py --model huggingface_models/SmolLM2-135M-moderation-demo --eval ...
One GPU, the original's 6B model:
    python inference/moderate.py --model togethercomputer/GPT-JT-Moderation-6B --gpu-id 0 "text"
The encoder kind (a sentence encoder with a classification head, `make demo-moderation`):
    python inference/moderate.py --model huggingface_models/MiniLM-moderation-demo --eval ...
MODEL: a folder written by training/train_moderation_classifier.py, an HF folder, a hub id, the
embedded model (default), or a trainer checkpoint folder (converted on the fly).
"""

from __future__ import annotations

import argparse
import os
import sys

from openchatkit.cli import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moderate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", nargs="?", help="the text to classify")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--input", metavar="FILE.jsonl", help="classify each record's `text`")
    what.add_argument(
        "--eval", metavar="FILE.jsonl", help="records with `text` and `label`: print accuracy"
    )
    p.add_argument("--model", default=None, help="moderation model (default: embedded SmolLM2)")
    p.add_argument("--json", action="store_true", help="print JSON (all five probabilities)")
    p.add_argument(
        "--examples",
        metavar="FILE.jsonl",
        help="few-shot examples, `text` and `label` per line (default: five built-in ones)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="with --eval: the bot policy's p(needs intervention) threshold to report "
        "(default: the model's own, as the bot uses it: an encoder model's tuned threshold, a "
        "causal LM's openchatkit.moderation.INTERVENTION_THRESHOLD)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="with --eval: also print the policy figures for thresholds 0.05 to 0.95 "
        "(tune on the held-out split, never on a check set)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    args = p.parse_args(argv)
    from openchatkit.errors import UserError

    given = sum(x is not None for x in (args.text, args.input, args.eval))
    if given != 1:
        raise UserError("give exactly one of: TEXT, --input FILE.jsonl, --eval FILE.jsonl")
    if args.text is not None and not args.text.strip():
        raise UserError("nothing to classify: the text is empty")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UserError("--threshold must be in (0, 1]")
    if (args.threshold is not None or args.sweep) and args.eval is None:
        raise UserError("--threshold and --sweep need --eval FILE.jsonl")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import json

    from openchatkit import moderation as mod
    from openchatkit.errors import UserError
    from openchatkit.evaluation.moderation_metrics import (
        evaluate,
        format_policy,
        format_report,
        policy_figures,
    )
    from openchatkit.inference.moderator import load_moderator

    # Read and check the input files before loading a model (seconds), so bad input fails fast.
    records = mod.read_labelled(args.eval) if args.eval else None
    texts = mod.read_texts(args.input) if args.input else None
    if args.examples:
        from openchatkit.inference.encoder_moderator import is_encoder_moderator

        if is_encoder_moderator(args.model):
            raise UserError(
                f"--examples: {args.model} is an encoder moderation model (a classification "
                "head, no few-shot prompt)"
            )
        mod.read_examples(args.examples)
    moderator = load_moderator(
        args.model,
        device=args.device,
        dtype=args.dtype,
        gpu_id=args.gpu_id,
        examples=args.examples,
        batch_size=args.batch_size,
    )
    if records is not None:
        results = moderator.classify_many([t for t, _ in records])
        report = evaluate([lab for _, lab in records], [r.label for r in results])
        report["model"] = moderator.name
        truth, probs = [lab for _, lab in records], [r.probabilities for r in results]
        threshold = moderator.threshold if args.threshold is None else args.threshold
        report["policy"] = policy_figures(truth, probs, threshold)
        if args.sweep:
            steps = [round(0.05 * k, 2) for k in range(1, 20)]
            report["sweep"] = [policy_figures(truth, probs, t) for t in steps]
        if args.json:
            print(json.dumps(report))
            return 0
        print(format_report(report))
        print("\n" + format_policy(report["policy"]))
        for figures in report.get("sweep", []):
            print("  " + format_policy(figures).split(": ", 1)[1] + f" at {figures['threshold']}")
        return 0
    if texts is not None:
        for text, r in zip(texts, moderator.classify_many(texts), strict=True):
            record = {"text": text, "label": r.label, "probability": round(r.probability, 6)}
            record["probabilities"] = {k: round(v, 6) for k, v in r.probabilities.items()}
            print(json.dumps(record, ensure_ascii=False))
        return 0
    r = moderator.classify_many([args.text])[0]
    if args.json:
        print(json.dumps({"label": r.label, "probabilities": r.probabilities}))
    else:
        print(f"{r.label} {r.probability:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="moderate.py", log_level="WARNING"))
