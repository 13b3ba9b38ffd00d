"""The trainer's configuration, tested alone: layer ranges per stage (upstream's remainder rule)
and `TrainConfig` derived once from the flags and frozen."""

from __future__ import annotations

import json

import pytest

from openchatkit.errors import UserError


def test_stage_layer_ranges_are_strict_except_upstreams_remainder():
    from openchatkit.training.config import stage_layer_ranges

    # GPT-NeoX-20B: 44 layers as 8 stages x 6, the last stage takes the remaining 2.
    ranges = stage_layer_ranges(44, 8, 6)
    assert [len(r) for r in ranges] == [6] * 7 + [2] and ranges[-1] == range(42, 44)
    assert stage_layer_ranges(30, 4, None) == [
        range(0, 8),
        range(8, 16),
        range(16, 23),
        range(23, 30),
    ]
    assert stage_layer_ranges(32, 4, 8) == [range(i * 8, i * 8 + 8) for i in range(4)]
    cases = (
        ((44, 8, 5), "use --num-layers 6 \\(the last stage takes the other 2\\)"),
        ((44, 8, 7), "use --num-layers 6"),
        ((32, 4, 9), "use --num-layers 8 or leave it out"),  # 36 layers' worth: no slack
        ((4, 2, 4), "use --num-layers 2"),
        ((9, 4, 3), "leave --num-layers out"),  # 3+3+3 leaves the 4th stage empty
        ((4, 5, None), "exceeds"),
    )
    for args, words in cases:
        with pytest.raises(UserError, match=words):
            stage_layer_ranges(*args)


def test_train_config_derives_once_and_is_frozen(tiny):
    import dataclasses

    from openchatkit.cli.train import build_parser, config_with_defaults
    from openchatkit.training.config import TrainConfig, read_model_shape

    flags = build_parser().parse_args(
        [
            "--model-name",
            str(tiny["llama"]),
            "--task-name",
            f"{tiny['train']}:2",
            "--pipeline-group-size",
            "2",
            "--data-group-size",
            "2",
            "--batch-size",
            "8",
            "--micro-batch-size",
            "2",
            "--gradient-accumulate-step",
            "3",
            "--seq-length",
            "16",
            "--bf16",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    config = TrainConfig.from_flags(flags, read_model_shape(tiny["llama"]), lambda: False)
    assert config.layer_ranges == (range(0, 2), range(2, 4))
    assert (config.replica_batch_sequences, config.num_microbatches) == (4, 2)
    assert (config.global_batch_sequences, config.tokens_per_step) == (24, 24 * 16)
    assert (config.precision, config.dp_backend, config.tokenizer_name) == (
        "bf16",
        "gloo",
        str(tiny["llama"]),
    )
    assert [t.name for t in config.tasks] == [str(tiny["train"])] and config.eval_tasks is None
    assert config.summary()["layers_per_stage"] == [2, 2]
    json.dumps(config.flags())  # meta.json and the tracker take it as it is
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    # The in-process constructor checks the same way.
    with pytest.raises(UserError, match="--micro-batch-size 3"):
        config_with_defaults(config.model, batch_size=8, micro_batch_size=3)
