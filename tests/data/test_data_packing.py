"""Packing, masks, mixing, determinism, exact resume and data-parallel rows, checked token by
token on a character-level tokenizer (one token per character, EOS shown as '|')."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from openchatkit.data import GlobalBatchLoader, PackedSequenceStream
from openchatkit.errors import UserError


def masked_view(tok, item) -> str:
    """The window's characters, with '_' where the label is -100 (loss off)."""
    chars = []
    for i, lab in zip(item["input_ids"].tolist(), item["labels"].tolist(), strict=True):
        c = "|" if i == tok.eos_token_id else tok.convert_ids_to_tokens(i)
        chars.append(c if lab != -100 else "_")
    return "".join(chars)


def texts(tmp_path, write_jsonl, name, docs):
    return write_jsonl(tmp_path / name, [{"text": d} for d in docs])


def test_pack_with_eos_between_documents(tmp_path, write_jsonl, char_tok, decode):
    f = texts(tmp_path, write_jsonl, "d.jsonl", ["ab", "cde", "f"])
    stream = PackedSequenceStream(str(f), char_tok, seq_length=5)
    items = [next(stream) for _ in range(4)]
    # The file is cycled: ab|cde|f|ab|cde|f|...
    assert [decode(char_tok, it["input_ids"]) for it in items] == [
        "ab|cd",
        "e|f|a",
        "b|cde",
        "|f|ab",
    ]
    for it in items:
        assert torch.equal(it["labels"], it["input_ids"])  # loss on every token ("all")
        assert torch.equal(it["position_ids"], torch.arange(5))
        assert all(v.dtype == torch.long and v.shape == (5,) for v in it.values())


def test_reset_position_ids_restart_per_document(tmp_path, write_jsonl, char_tok):
    f = texts(tmp_path, write_jsonl, "d.jsonl", ["ab", "cde", "f"])
    stream = PackedSequenceStream(str(f), char_tok, seq_length=5, reset_position_ids=True)
    positions = [next(stream)["position_ids"].tolist() for _ in range(3)]
    # windows "ab|cd", "e|f|a", "b|cde": restart after each EOS and at each window start
    assert positions == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 0], [0, 1, 0, 1, 2]]


def test_bot_mask_token_by_token(tmp_path, write_jsonl, char_tok):
    convo = "<human>: hi\n<bot>: yo\n<human>: ok\n<bot>: fine"
    ends_human = "<human>: a\n<bot>: b\n<human>: c"
    plain = "just text"
    f = texts(tmp_path, write_jsonl, "d.jsonl", [convo, ends_human, plain])
    total = len(convo) + len(ends_human) + len(plain) + 3
    stream = PackedSequenceStream(str(f), char_tok, seq_length=total, loss_on="bot")
    view = masked_view(char_tok, next(stream))
    expected = (
        # answers are learned up to and including the next "<human>:" marker, which ends the turn
        "_" * len("<human>: hi\n<bot>:")
        + " yo\n<human>:"
        + "_" * len(" ok\n<bot>:")
        + " fine|"
        # a conversation ending on a human turn: its EOS is not learned
        + "_" * len("<human>: a\n<bot>:")
        + " b\n<human>:"
        + "_" * len(" c")
        + "_"
        # text without turn markers is learned whole
        + "just text|"
    )
    assert view == expected


def test_messages_rendered_with_chat_template(tmp_path, write_jsonl, char_tok):
    tok = char_tok.__class__(tokenizer_object=char_tok.backend_tokenizer, eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "bye"},
    ]
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    rendered = "user: hi\nassistant: yo\nuser: ok\nassistant: bye\n"
    bot = PackedSequenceStream(str(f), tok, seq_length=len(rendered) + 1, loss_on="bot")
    assert masked_view(tok, next(bot)) == (
        "_" * len("user: hi\nassistant: ") + "yo\n" + "_" * len("user: ok\nassistant: ") + "bye\n|"
    )
    every = PackedSequenceStream(str(f), tok, seq_length=len(rendered) + 1, loss_on="all")
    assert masked_view(tok, next(every)) == rendered + "|"
    # Without a chat template, `messages` data is a clear error.
    with pytest.raises(UserError, match="chat template"):
        next(PackedSequenceStream(str(f), char_tok, seq_length=8))


def test_weights_give_expected_proportions(tmp_path, write_jsonl, char_tok):
    a = texts(tmp_path, write_jsonl, "a.jsonl", ["a"] * 40)
    b = texts(tmp_path, write_jsonl, "b.jsonl", ["b"] * 40)
    c = texts(tmp_path, write_jsonl, "c.jsonl", ["c"] * 40)
    stream = PackedSequenceStream(f"{a}:6,{b}:3,{c}:1", char_tok, seq_length=100, seed=3)
    ids = torch.cat([next(stream)["input_ids"] for _ in range(120)])  # 6000 documents
    counts = {ch: int((ids == char_tok.convert_tokens_to_ids(ch)).sum()) for ch in "abc"}
    n = sum(counts.values())
    # Binomial std at n=6000 is <= 0.0065; allow ~4 std.
    assert abs(counts["a"] / n - 0.6) < 0.025
    assert abs(counts["b"] / n - 0.3) < 0.025
    assert abs(counts["c"] / n - 0.1) < 0.025


def test_deterministic_for_a_seed(tmp_path, write_jsonl, char_tok):
    a = texts(tmp_path, write_jsonl, "a.jsonl", [f"a{i}" for i in range(30)])
    b = texts(tmp_path, write_jsonl, "b.jsonl", [f"b{i}" for i in range(30)])

    def run(seed):
        s = PackedSequenceStream(f"{a},{b}", char_tok, seq_length=12, seed=seed)
        return torch.stack([next(s)["input_ids"] for _ in range(20)])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def mixed_spec(tmp_path: Path, write_jsonl) -> str:
    """A jsonl, a jsonl.gz and a parquet task with documents of varied length and malformed
    lines, small enough that the stream cycles them several times."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"<human>: q{i}\n<bot>: {'x' * (i % 9)}{i}" for i in range(23)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:13]] + ["{broken"])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for d in docs[13:]:
            f.write(json.dumps({"text": d.upper()}) + "\n")
    table = pa.table({"text": [f"p{i}" * (1 + i % 4) for i in range(17)]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=5)
    return f"{tmp_path / 'a.jsonl'}:2,{tmp_path / 'b.jsonl.gz'}:1,{tmp_path / 'c.parquet'}:1"


@pytest.mark.parametrize("loss_on", ["all", "bot"])
def test_state_dict_resume_yields_the_same_next_batches(tmp_path, write_jsonl, char_tok, loss_on):
    spec = mixed_spec(tmp_path, write_jsonl)

    def loader():
        stream = PackedSequenceStream(
            spec, char_tok, seq_length=16, seed=7, loss_on=loss_on, reset_position_ids=True,
            docs_per_chunk=5,
        )  # fmt: skip
        return GlobalBatchLoader(stream, global_batch_size=3)

    uninterrupted = loader()
    reference = [next(uninterrupted) for _ in range(40)]
    for stop in (0, 1, 2, 5, 13, 27):
        first = loader()
        for _ in range(stop):
            next(first)
        # The state survives a JSON round trip (what a checkpoint stores).
        state = json.loads(json.dumps(first.state_dict()))
        resumed = loader()
        resumed.load_state_dict(state)
        assert resumed.num_batches == stop
        for expected in reference[stop : stop + 8]:
            got = next(resumed)
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(got[key], expected[key]), (stop, key)


def test_prefetching_loader_gives_the_same_batches_and_the_consumed_state(
    tmp_path, write_jsonl, char_tok
):
    from openchatkit.data.packing import PrefetchingLoader

    spec = mixed_spec(tmp_path, write_jsonl)

    def loader():
        stream = PackedSequenceStream(spec, char_tok, seq_length=16, seed=7, docs_per_chunk=5)
        return GlobalBatchLoader(stream, global_batch_size=3)

    plain, ahead = loader(), PrefetchingLoader(loader(), depth=3)
    assert ahead.state_dict() == plain.state_dict()
    for _ in range(12):
        expected, got = next(plain), next(ahead)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(got[key], expected[key])
        # The state of what was handed out, not of what was read ahead.
        assert ahead.state_dict() == plain.state_dict()
    ahead.close()
    # The end of a non-cycling stream (StopIteration) reaches the consumer, in order.
    once = lambda: GlobalBatchLoader(  # noqa: E731
        PackedSequenceStream(spec, char_tok, seq_length=16, cycle=False), global_batch_size=3
    )
    assert len(list(PrefetchingLoader(once()))) == len(list(once())) > 0


def test_resume_state_is_small(tmp_path, write_jsonl, char_tok):
    spec = mixed_spec(tmp_path, write_jsonl)
    stream = PackedSequenceStream(spec, char_tok, seq_length=4096, docs_per_chunk=64)
    next(stream)
    assert len(json.dumps(stream.state_dict())) < 2000  # no token buffer in the state


def test_resume_rejects_other_tasks(tmp_path, write_jsonl, char_tok):
    a = texts(tmp_path, write_jsonl, "a.jsonl", ["aa"])
    b = texts(tmp_path, write_jsonl, "b.jsonl", ["bb"])
    state = PackedSequenceStream(str(a), char_tok, seq_length=4).state_dict()
    with pytest.raises(UserError, match="same --task-name"):
        PackedSequenceStream(str(b), char_tok, seq_length=4).load_state_dict(state)


def test_dp_ranks_take_disjoint_rows_of_the_same_global_batch(tmp_path, write_jsonl, char_tok):
    f = texts(tmp_path, write_jsonl, "d.jsonl", [f"doc{i:03d}" for i in range(200)])

    def loader(rank, size):
        return GlobalBatchLoader(
            PackedSequenceStream(str(f), char_tok, seq_length=8, seed=0), 4, rank, size
        )

    single = loader(0, 1)
    ranks = [loader(r, 2) for r in range(2)]
    seen: list[set] = [set(), set()]
    for _ in range(10):
        full = next(single)
        parts = [next(r) for r in ranks]
        for key in full:
            assert parts[0][key].shape == (2, 8)
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
        for r in range(2):
            seen[r] |= {tuple(row) for row in parts[r]["input_ids"].tolist()}
    assert len(seen[0]) == 20 and len(seen[1]) == 20 and not seen[0] & seen[1]
    with pytest.raises(UserError, match="multiple of the data-parallel size"):
        GlobalBatchLoader(PackedSequenceStream(str(f), char_tok, seq_length=8), 3, 0, 2)


def test_non_cycling_stream_reads_everything_once_and_pads(tmp_path, write_jsonl, char_tok):
    f = texts(tmp_path, write_jsonl, "d.jsonl", ["ab", "cde"])
    stream = PackedSequenceStream(str(f), char_tok, seq_length=4, cycle=False)
    views = [masked_view(char_tok, it) for it in stream]
    assert views == ["ab|c", "de|_"]  # the pad is an EOS with its loss off


def test_malformed_lines_are_counted_and_warned_once(tmp_path, write_jsonl, char_tok):
    from loguru import logger

    f = write_jsonl(
        tmp_path / "m.jsonl",
        [{"text": "ok"}, "not json", {"meta": 1}, {"text": ""}, {"text": "  "}, "[1, 2]", {"text": 5}, "\"str\"", "null", {"text": "fine"}],
    )  # fmt: skip
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        stream = PackedSequenceStream(str(f), char_tok, seq_length=10)
        views = [masked_view(char_tok, next(stream)) for _ in range(4)]  # several epochs
    finally:
        logger.remove(sink)
    assert views[0] == "ok|fine|ok"
    assert stream.malformed_counts() == {str(f): 8}
    warnings = [m for m in messages if "malformed" in m]
    assert len(warnings) == 1 and str(f) in warnings[0] and "skipped 8" in warnings[0]


def test_strict_data_makes_malformed_lines_fatal(tmp_path, write_jsonl, char_tok):
    f = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, "", {"text": "ok"}, "not json"])
    stream = PackedSequenceStream(str(f), char_tok, seq_length=10, strict_data=True)
    with pytest.raises(UserError, match=r"m\.jsonl:4: not valid JSON \(--strict-data"):
        next(stream)
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as gz:
        gz.write('{"text": "ok"}\n{"text": ""}\n')
    stream = PackedSequenceStream(str(tmp_path / "g.jsonl.gz"), char_tok, 10, strict_data=True)
    with pytest.raises(UserError, match=r"g\.jsonl\.gz:2: empty `text`"):
        next(stream)


def test_file_without_usable_documents_is_an_error(tmp_path, write_jsonl, char_tok):
    f = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"text": ""}])
    with pytest.raises(UserError, match="no usable documents"):
        next(PackedSequenceStream(str(f), char_tok, seq_length=4))


def test_corrupt_gzip_is_an_error(tmp_path, char_tok):
    f = tmp_path / "x.jsonl.gz"
    f.write_bytes(b"\x1f\x8b\x08 this is not gzip")
    with pytest.raises(UserError, match="corrupt"):
        next(PackedSequenceStream(str(f), char_tok, seq_length=4))


def test_bad_arguments(tmp_path, write_jsonl, char_tok):
    f = texts(tmp_path, write_jsonl, "d.jsonl", ["ab"])
    with pytest.raises(UserError, match="--loss-on"):
        PackedSequenceStream(str(f), char_tok, seq_length=4, loss_on="human")
    with pytest.raises(UserError, match="--seq-length"):
        PackedSequenceStream(str(f), char_tok, seq_length=0)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch, char_tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stream = PackedSequenceStream("someone/some-dataset", char_tok, seq_length=8)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        next(stream)


def test_bundled_sample_with_embedded_tokenizer(tmp_path, write_jsonl):
    from transformers import AutoTokenizer

    from openchatkit.models.embedded import ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model())
    text = "<human>: What is the capital of France?\n<bot>: The capital of France is Paris."
    f = write_jsonl(tmp_path / "one.jsonl", [{"text": text}])
    item = next(PackedSequenceStream(str(f), tok, seq_length=64, loss_on="bot", cycle=False))
    learned = [
        i
        for i, lab in zip(item["input_ids"].tolist(), item["labels"].tolist(), strict=True)
        if lab != -100
    ]
    assert tok.decode(learned) == " The capital of France is Paris." + tok.eos_token
    # The whole bundled sample streams cleanly: no malformed lines, every window full.
    sample = Path(__file__).resolve().parents[2] / "data" / "OIG-sample"
    stream = PackedSequenceStream(
        f"{sample / 'train.jsonl'},{sample / 'valid.jsonl'}",
        tok,
        seq_length=512,
        loss_on="bot",
    )
    for _ in range(30):
        it = next(stream)
        assert (it["labels"] != -100).any()
    assert stream.malformed_counts() == {}


def test_hub_source_streams_cycles_and_resumes(monkeypatch, tmp_path, write_jsonl, char_tok):
    import datasets

    records = [{"text": f"h{i}"} for i in range(9)] + [{"text": ""}]
    opened: list[str] = []

    def fake_load_dataset(name, split=None, streaming=False):
        assert streaming and split == "train"
        opened.append(name)
        return datasets.Dataset.from_list(records).to_iterable_dataset()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    local = texts(tmp_path, write_jsonl, "l.jsonl", ["L1", "L2"])
    spec = f"someone/chat:1,{local}:1"

    def loader():
        stream = PackedSequenceStream(spec, char_tok, seq_length=7, seed=5, docs_per_chunk=4)
        return GlobalBatchLoader(stream, 2)

    full = loader()
    reference = [next(full) for _ in range(12)]
    joined = "".join(
        "|" if i == char_tok.eos_token_id else char_tok.convert_ids_to_tokens(i)
        for b in reference
        for i in b["input_ids"].flatten().tolist()
    )
    assert "h8|" in joined and "h0|" in joined[joined.index("h8|") :]  # cycled past its end
    assert opened[0] == "someone/chat"
    first = loader()
    for _ in range(5):
        next(first)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in reference[5:]:
        assert torch.equal(next(resumed)["input_ids"], expected["input_ids"])
    assert full.stream.malformed_counts() == {"someone/chat": 1}
