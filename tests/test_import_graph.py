"""The library's import graph: no circle between files, and no import running back up the layers.

Every module of `openchatkit/` is parsed with `ast`; every `import` counts, at module level and
inside functions (the library imports torch and transformers lazily, so most of its real edges
are function-level). Imports under `if TYPE_CHECKING:` never run: they count for the layers (a
type from a higher layer is still a reach upward) but not for circles. Nothing is imported to
find the edges.

The layers, top to bottom (`LAYERS`; a module may import its own layer or any layer below):

1. scripts (data/, pretrained/, training/, tools/, inference/, retrieval/, evaluation/,
   benchmarks/): outside the package, so nothing here can import them;
2. `cli`: the argument parsers and one-line error handling that several scripts share;
3. the applications: `training`, `evaluation`, `inference`, and `export` (model files for
   other runtimes). They may import each other (evaluation scores with the inference code
   and reads trainer checkpoints) as long as no circle forms;
4. `data`, with `moderation` (its label and prompt format is what `data/moderation.py` packs)
   and `retrieval` (text corpora and their index: data that the bot reads, no model of ours);
5. `models`: architectures, weights, conversion, LoRA, loading;
6. infrastructure: `fileio`, `distributed`, `hub`, `paths` (where downloads and conversions
   live) and `checkpoints` (the torch-free read side of the trainer-checkpoint layout, which
   `models/convert.py`, evaluation and moderation read without reaching into `training`);
7. the ground floor: `conversation` (the chat format), `errors`, `terminal` (text shown on a
   terminal) and the package's own `__init__`.

A new top-level module or package fails `test_every_module_has_a_layer` until it is given a
place in `LAYERS`, with a line here saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openchatkit"

# Top to bottom; a name is a module or package under openchatkit (a package covers its modules).
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("training", "evaluation", "inference", "export"),
    ("data", "moderation", "retrieval"),
    ("models",),
    ("fileio", "distributed", "hub", "paths", "checkpoints"),
    ("conversation", "errors", "terminal", ""),  # "" is openchatkit/__init__.py
]


def module_files() -> dict[str, Path]:
    """{"openchatkit.models.lora": path, "openchatkit.data": path of its __init__, ...}."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` runs: the longest prefix that is one."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def imports_of(
    module: str, path: Path, modules: dict[str, Path], type_checking: bool = True
) -> set[str]:
    """Modules of ours that `module` imports anywhere in its file; type_checking=False leaves
    out the imports under `if TYPE_CHECKING:`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if type_checking else _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*base, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of
            # pkg. (A submodule's parent packages run first in Python anyway; those edges
            # from a package to its parts are not counted, or every package would be a circle.)
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "openchatkit":
                continue
            target = _target(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def graph(type_checking: bool = True) -> dict[str, set[str]]:
    """{module: the modules of ours it imports}."""
    modules = module_files()
    return {m: imports_of(m, p, modules, type_checking) for m, p in modules.items()}


def layer_of(module: str) -> int | None:
    """Index into LAYERS of the entry that holds `module` (its top-level name under the package)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in module_files() if layer_of(m) is None)
    assert not unplaced, f"give these a layer in LAYERS (and the docstring): {unplaced}"


def test_no_import_runs_back_up_the_layers():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in sorted(graph().items())
        for b in sorted(targets)
        if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) < layer_of(a)
    ]
    assert not upward, "imports running back up:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle in the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_no_import_circle_between_files():
    cycle = find_cycle(graph(type_checking=False))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail():
    """The circle search and the layer lookup on made-up graphs, so a pass above means
    something: a three-file circle is found, a tree is not, and a low module is placed low."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert (
        layer_of("openchatkit.errors")
        > layer_of("openchatkit.models.lora")
        > layer_of("openchatkit.training.engine")
    )
    assert layer_of("openchatkit.no_such_module") is None
    # The parser sees function-level imports: models/lora/merge.py imports peft only inside
    # functions, and our own modules the same way.
    modules = module_files()
    merge = "openchatkit.models.lora.merge"
    assert "openchatkit.models.quiet" in imports_of(merge, modules[merge], modules)
