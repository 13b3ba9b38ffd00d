"""The trainer behind `training/dist_clm_train.py`: its configuration (`config`; the flags are
parsed by `openchatkit.cli.train`), the pipeline x data-parallel step (`engine`), mixed
precision (`precision`), optimizer and LR schedule (`optim`), checkpoints (`checkpoint`), step
logs and metrics.jsonl (`metrics`), tidy traces (`profiling`) and the run loop (`trainer`).

Importing this package is cheap: torch is imported by the submodules that need it.
"""
