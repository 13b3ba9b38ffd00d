"""`eval.py --output DIR` into a folder that holds results of another run needs --overwrite:
the run would replace results.json and report.md there and delete its results_<n>.json.
Checked in process through `main(argv)`: the refusal comes before any model is loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from openchatkit.errors import UserError

EVAL = Path(__file__).resolve().parents[2] / "evaluation" / "eval.py"


@pytest.fixture(scope="module")
def eval_script():
    spec = importlib.util.spec_from_file_location("eval_script", EVAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["results.json", "report.md", "results_3.json"])
def test_output_holding_results_needs_overwrite(eval_script, tmp_path, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("an earlier run's numbers")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--output {out} already holds {name}.*--overwrite"):
        eval_script.main(["--tasks", "perplexity", "--output", str(out)])
    assert (out / name).read_text() == "an earlier run's numbers"


def test_overwrite_or_a_folder_without_results_passes_the_check(eval_script, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not results")
    args = eval_script.parse_args(["--output", str(out)])
    eval_script.check_output_free(out, args)  # other files are never touched: no refusal
    (out / "results.json").write_text("{}")
    eval_script.check_output_free(
        out, eval_script.parse_args(["--output", str(out), "--overwrite"])
    )
    default = eval_script.parse_args([])  # eval_results/<model>/ is the kit's own folder
    eval_script.check_output_free(out, default)
