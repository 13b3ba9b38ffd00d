"""Train the encoder moderation model: all-MiniLM-L6-v2 (embedded, frozen) + a logistic-regression
head over the five labels, its L2 strength and refusal threshold chosen on the held-out split only.

    python training/train_moderation_classifier.py --output huggingface_models/MiniLM-moderation-demo
    python training/train_moderation_classifier.py --output DIR --overwrite \\
        --train data/moderation-sample/train.jsonl --valid data/moderation-sample/valid.jsonl \\
        --report data/moderation-sample/check.jsonl        # figures only, never for choices
    python inference/moderate.py --model DIR --eval data/moderation-sample/check.jsonl
    python inference/bot.py --moderation DIR

Recipe (openchatkit/training/moderation_classifier.py): embed both splits; for each C of --c
(default 0.03 0.1 0.3 1 3 10) fit the head on --train; on --valid set its threshold to the lowest
p(needs intervention) refusing <= --max-casual-refused (5 %) of valid's casual messages; keep the
C catching the most `needs intervention` messages of --valid there. --report FILE prints the
finished model's figures on FILE beside --valid's (side by side); it never changes the model.
The output folder (atomic) holds moderation_classifier.json (labels, threshold, the encoder
reference, how it was made) and moderation_head.safetensors; `--moderation DIR` in the bot and
serve.py, and `moderate.py --model DIR`, load it. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from openchatkit.cli import run_main

SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "moderation-sample"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from openchatkit.training.moderation_classifier import DEFAULT_C_GRID, MAX_CASUAL_REFUSED

    p = argparse.ArgumentParser(
        prog="train_moderation_classifier.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier model at DIR")
    p.add_argument("--train", default=os.path.join(SAMPLE, "train.jsonl"), metavar="FILE.jsonl")
    p.add_argument(
        "--valid",
        default=os.path.join(SAMPLE, "valid.jsonl"),
        metavar="FILE.jsonl",
        help="held-out split (other intent families): chooses C and the threshold",
    )
    p.add_argument(
        "--report",
        metavar="FILE.jsonl",
        action="append",
        default=[],
        help="also print the finished model's figures on FILE (repeatable; never used to choose)",
    )
    p.add_argument(
        "--c", type=float, nargs="+", default=list(DEFAULT_C_GRID), help="L2 strengths to try"
    )
    p.add_argument(
        "--max-casual-refused",
        type=float,
        default=MAX_CASUAL_REFUSED,
        metavar="SHARE",
        help="the threshold refuses at most this share of --valid's casual messages (0.05)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoder pass (32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    from openchatkit.errors import UserError

    if any(not c > 0 for c in args.c):
        raise UserError("--c: every value must be > 0")
    if not 0 <= args.max_casual_refused < 1:
        raise UserError("--max-casual-refused must be in [0, 1)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from openchatkit.fileio import check_output_folder
    from openchatkit.inference.encoder_moderator import (
        DEFAULT_ENCODER,
        EncoderModerator,
        encoder_path,
        save_encoder_moderator,
    )
    from openchatkit.models.quiet import quiet_transformers
    from openchatkit.moderation import LABELS, read_labelled
    from openchatkit.training import moderation_classifier as mc

    # Every input and the output folder are checked before the encoder runs.
    train = read_labelled(args.train, what="--train")
    valid = read_labelled(args.valid, what="--valid")
    reports = [(path, read_labelled(path, what="--report")) for path in args.report]
    check_output_folder(args.output, args.overwrite)

    # torch and transformers after those checks: bad input is refused without their import.
    import torch
    from transformers import AutoModel, AutoTokenizer

    start = time.perf_counter()
    source = encoder_path(DEFAULT_ENCODER, None)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        encoder = AutoModel.from_pretrained(source, local_files_only=True)
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    encoder.to(device).eval()
    dim = encoder.config.hidden_size
    moderator = EncoderModerator(
        encoder, tokenizer, torch.zeros(len(LABELS), dim), torch.zeros(len(LABELS)),
        device=device, batch_size=args.batch_size, name=args.output,
    )  # fmt: skip

    def embed(records):
        with torch.inference_mode():
            return moderator.embed([text for text, _ in records]).cpu()

    train_x, valid_x = embed(train), embed(valid)
    print(
        f"embedded {len(train)} training and {len(valid)} held-out messages with "
        f"{DEFAULT_ENCODER} in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    chosen = mc.select_head(
        train_x,
        [label for _, label in train],
        valid_x,
        [label for _, label in valid],
        args.c,
        args.max_casual_refused,
    )
    print(f"held-out split {args.valid}: every C (threshold chosen per C, on this split)")
    for row in chosen["grid"]:
        print(
            f"  C {row['c']:<6g} threshold {row['threshold']:.2f}  exact {row['exact']:.3f}  "
            f"needs-intervention recall {row['intervention_recall']:.3f}  casual refused "
            f"{row['casual_refused']:.3f}"
        )
    print(
        f"chosen: C {chosen['c']:g}, refuse when p(needs intervention) >= {chosen['threshold']:.2f}"
    )
    moderator.weight, moderator.bias = chosen["weight"].to(device), chosen["bias"].to(device)
    moderator.threshold = chosen["threshold"]
    training = {
        "recipe": "frozen encoder + multinomial logistic regression (L-BFGS)",
        "train": os.path.abspath(args.train),
        "valid": os.path.abspath(args.valid),
        "c": chosen["c"],
        "c_grid": sorted(args.c),
        "max_casual_refused": args.max_casual_refused,
        "valid_figures": chosen["valid"],
    }
    save_encoder_moderator(args.output, moderator, DEFAULT_ENCODER, training, args.overwrite)

    columns = {"valid (held-out families)": chosen["valid"]}
    for path, records in reports:
        probs = moderator.probabilities([text for text, _ in records])
        figures = mc.report_figures(probs, [label for _, label in records], moderator.threshold)
        columns[f"{os.path.basename(path)} (report only)"] = figures
    print()
    print(mc.format_side_by_side(columns))
    print(f"\nmoderation model: {args.output} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="train_moderation_classifier.py", log_level="WARNING"))
