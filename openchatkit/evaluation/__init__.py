"""Evaluation of chat models: perplexity as lm-eval scores it, lm-eval benchmarks offline from
packaged data, a chat suite, and the results.json / report.md they leave (`evaluation/eval.py`)."""
