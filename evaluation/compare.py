"""Compare eval.py runs: one table side by side with deltas against the first, and a bar chart.

    python evaluation/compare.py eval_results/SmolLM2-135M-Instruct/results.json \
        eval_results/SmolLM2-135M-OIG-demo/results.json --plot before_after.png
    python evaluation/compare.py eval_results/A eval_results/B --output comparison.md

Each argument is a results.json written by eval.py (or the folder holding it). The table is
printed (Markdown); --plot draws a PNG with one bar per model and stderr error bars;
--output also writes the table (with the chat answers, if any) as a Markdown report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files or folders")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw a bar chart into PNG")
    p.add_argument("--output", default=None, metavar="MD", help="write the report as Markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openchatkit.evaluation.report import comparison_table, load_results, plot, render_report
    from openchatkit.fileio import atomic_file

    records = [load_results(path) for path in args.results]
    names = [r["model"] for r in records]
    for i, name in enumerate(names):
        if names.count(name) > 1:  # two runs of one model: tell them apart by their file
            records[i] = {**records[i], "model": f"{name} ({args.results[i]})"}
    print(comparison_table(records))
    if args.output:
        try:
            with atomic_file(Path(args.output)) as f:
                f.write(render_report(records))
        except OSError as err:
            raise UserError(
                f"--output: cannot write {args.output}: {err.strerror or err}"
            ) from None
    if args.plot:
        try:
            plot(records, Path(args.plot))
        except OSError as err:
            raise UserError(f"--plot: cannot write {args.plot}: {err.strerror or err}") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
