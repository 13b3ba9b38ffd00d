"""`quiet_transformers`: transformers' warnings and per-tensor progress bars off while a model
loads. A module of its own so that the loaders (`models/loading.py`, `models/lora/merge.py`, the
evaluation and export code) share it without importing each other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and per-tensor progress bars while loading."""
    import transformers.utils.logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
