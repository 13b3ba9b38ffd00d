"""The trainer behind `training/dist_clm_train.py`: flags (`args`), the pipeline x data-parallel
step (`engine`), mixed precision (`precision`), optimizer and LR schedule (`optim`), checkpoints
(`checkpoint`), step logs (`metrics`), tidy traces (`profiling`) and the run loop (`trainer`).

Importing this package is cheap: torch is imported by the submodules that need it.
"""
