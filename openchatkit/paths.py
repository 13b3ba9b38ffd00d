"""Where the project keeps what it downloads or converts.

The default root is the repository checkout (the package is installed editable); set
`OPENCHATKIT_HOME` to put models elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def project_home() -> Path:
    """The folder under which `huggingface_models/` lives."""
    env = os.environ.get("OPENCHATKIT_HOME")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT
    return Path.home() / ".cache" / "openchatkit"


def models_dir() -> Path:
    """`<home>/huggingface_models`: HF-format model folders converted or downloaded by the kit."""
    return project_home() / "huggingface_models"
