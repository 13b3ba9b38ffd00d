"""README.md's file map names every library file under `openchatkit/`: a new module fails this
test until the map says what it is for.

The map is the code block under "## File map". A line `  name/` opens the section of the
package `openchatkit/name/` (its indented continuation lines belong to it); a line `  file.py`
lists top-level modules. A module counts as listed when its file name appears in its package's
section (`__init__.py` files are not listed)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def file_map_sections(readme: str) -> dict[str, str]:
    """{"": the top-level module lines, "models": the models/ section, ...}."""
    block = readme.split("## File map", 1)[1].split("```", 2)[1]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        package = re.match(r"^  (\w+)/(\s|$)", line)
        if package:
            current = package.group(1)
        elif re.match(r"^  \w+\.py", line):
            current = ""
        elif not line.startswith("    "):
            current = None  # a top-level repository entry (data/, tools/, openchatkit/ ...)
            continue
        if current is not None:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def unlisted(readme: str, package: Path) -> list[str]:
    sections = file_map_sections(readme)
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        parts = path.relative_to(package).parts
        section = "" if len(parts) == 1 else parts[0]
        if not re.search(rf"(?<![\w.]){re.escape(path.name)}\b", sections.get(section, "")):
            missing.append(str(path.relative_to(package.parent)))
    return missing


def test_every_library_file_is_in_the_file_map():
    missing = unlisted((REPO / "README.md").read_text(), REPO / "openchatkit")
    assert not missing, f"add these to README.md's file map: {missing}"


def test_the_check_can_fail(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for name in ("top.py", "sub/listed.py", "sub/forgotten.py", "sub/__init__.py"):
        (tmp_path / "pkg" / name).write_text("")
    readme = "## File map\n\n```\npkg/\n  top.py   x\n  sub/     listed.py, top.py\n```\n"
    assert unlisted(readme, tmp_path / "pkg") == ["pkg/sub/forgotten.py"]
