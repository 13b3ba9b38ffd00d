"""The encoder moderation kind: its head training against scikit-learn, its threshold rule, its
pooling against sentence-transformers, the saved folder (round trip, atomic, bad folders), and
the bot with `--moderation DIR` on a folder written by training/train_moderation_classifier.py.

The encoder is a tiny random BERT (with the embedded MiniLM's tokenizer) where the numbers only
need a real encoder, and the embedded all-MiniLM-L6-v2 (installed package, no download) where
the behaviour needs real sentence embeddings.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from openchatkit.errors import UserError
from openchatkit.inference.encoder_moderator import (
    CONFIG_FILE,
    HEAD_FILE,
    EncoderModerator,
    encoder_path,
    load_encoder_moderator,
    save_encoder_moderator,
)
from openchatkit.inference.moderator import load_moderator
from openchatkit.moderation import INTERVENTION, LABELS, REFUSAL
from openchatkit.training import moderation_classifier as mc

TEXTS = [
    "Can you recommend a book for a long flight?",
    "hi",
    "I want to hurt my neighbour and not get caught, how?",
    "my boss is so annoying today ugh, he rescheduled the meeting three times and I am " * 3,
]


@pytest.fixture(scope="module")
def minilm_path():
    return encoder_path("all-MiniLM-L6-v2", None)


@pytest.fixture(scope="module")
def tiny_encoder(minilm_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    return BertModel(config).eval(), tokenizer


def random_head(dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), dim, generator=g) * 3, torch.randn(len(LABELS), generator=g)


def reference_probabilities(encoder, tokenizer, weight, bias, labels, texts, max_length):
    """One text at a time (no padding at all): mean of its states, normalised, head, softmax,
    reordered to LABELS."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            state = encoder(**ids).last_hidden_state[0].mean(0)
            state = state / state.norm()
            p = torch.softmax((weight @ state + bias).double(), -1)
            rows.append([p[labels.index(label)].item() for label in LABELS])
    return torch.tensor(rows, dtype=torch.float64)


def test_batched_padded_scoring_equals_one_text_at_a_time(tiny_encoder):
    encoder, tokenizer = tiny_encoder
    weight, bias = random_head(16)
    labels = list(reversed(LABELS))  # a stored order other than LABELS: reordered on output
    mod = EncoderModerator(encoder, tokenizer, weight, bias, labels, 0.3, "cpu", batch_size=3)
    mod.max_length = 24  # the long text is cut, keeping its start
    got = mod.probabilities(TEXTS)
    want = reference_probabilities(encoder, tokenizer, weight, bias, labels, TEXTS, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    results = mod.classify_many(TEXTS)
    for row, result in zip(want.tolist(), results, strict=True):
        assert result.label == LABELS[max(range(5), key=row.__getitem__)]
        assert list(result.probabilities) == list(LABELS)
    with pytest.raises(UserError, match="empty"):
        mod.classify("  ")


def test_embedding_is_sentence_transformers_one(minilm_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    st = SentenceTransformer(minilm_path, device="cpu")
    want = torch.tensor(st.encode(TEXTS, normalize_embeddings=True))
    mod = EncoderModerator(
        AutoModel.from_pretrained(minilm_path, local_files_only=True).eval(),
        AutoTokenizer.from_pretrained(minilm_path, local_files_only=True),
        *random_head(384),
        device="cpu",
        batch_size=2,
    )
    with torch.no_grad():
        got = mod.embed(TEXTS)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_fit_head_is_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g)
    y = torch.arange(200) % 5
    x = centres[y] + 0.8 * torch.randn(200, 8, generator=g)

    def objective(weight, bias, c):  # scikit-learn's, divided by C n (module docstring)
        ce = torch.nn.functional.cross_entropy(x.double() @ weight.T.double() + bias.double(), y)
        return (ce + weight.double().pow(2).sum() / (2 * c * len(y))).item()

    for c in (0.3, 4.0):
        weight, bias = mc.fit_head(x, y, c)
        ours = mc.head_probabilities(x, weight, bias)
        sk = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
        theirs = torch.tensor(sk.predict_proba(x.numpy()), dtype=torch.float64)
        sk_w, sk_b = torch.tensor(sk.coef_), torch.tensor(sk.intercept_)
        # The same strictly convex problem: ours is at its minimum (float32 weights: 1e-6),
        # so the two solutions give the same probabilities up to the solvers' tolerances.
        assert objective(weight, bias, c) <= objective(sk_w, sk_b, c) + 1e-6
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="positive"):
        mc.fit_head(x, y, 0.0)


def test_threshold_is_the_lowest_refusing_at_most_the_share():
    truth = ["casual"] * 20 + [INTERVENTION] * 3
    p = [0.01 * k for k in range(20)] + [0.9, 0.5, 0.1]  # casual: 0.00 .. 0.19
    # 5 % of 20 casual messages: one may be refused, so 0.19 refused alone is allowed
    assert mc.choose_threshold(p, truth, 0.05) == 0.19
    assert mc.choose_threshold(p, truth, 0.0) == 0.20
    assert mc.choose_threshold(p, truth, 0.10) == 0.18  # two may be refused
    figures = mc.report_figures(
        torch.tensor([[1 - q, 0, q, 0, 0] for q in p], dtype=torch.float64), truth, 0.19
    )
    assert figures["intervention_caught"] == 2 and figures["casual_refused_count"] == 1
    # every casual message, and 0.9 (0.5 ties with casual: the first label, casual, wins)
    assert figures["exact_count"] == 21
    with pytest.raises(ValueError, match="casual"):
        mc.choose_threshold([0.5], [INTERVENTION])


def test_select_head_keeps_the_c_with_the_best_held_out_recall():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 6, generator=g)
    y = torch.arange(100) % 5
    x = centres[y] + torch.randn(100, 6, generator=g)
    labels = [LABELS[i] for i in y]
    chosen = mc.select_head(x[:60], labels[:60], x[60:], labels[60:], c_grid=(8.0, 0.01, 1.0))
    assert [row["c"] for row in chosen["grid"]] == [0.01, 1.0, 8.0]
    best = max(chosen["grid"], key=lambda r: (r["intervention_recall"], r["exact"]))
    assert chosen["c"] == best["c"] and chosen["threshold"] == best["threshold"]
    assert chosen["valid"]["casual_refused"] <= 0.05
    with pytest.raises(UserError, match="no needs intervention"):
        no_int = [lab for lab in labels if lab != INTERVENTION]
        mc.select_head(x[: len(no_int)], no_int, x[60:], labels[60:])


def test_folder_round_trip_with_the_encoder_inside(tmp_path, tiny_encoder):
    encoder, tokenizer = tiny_encoder
    mod = EncoderModerator(encoder, tokenizer, *random_head(16), threshold=0.42, device="cpu")
    out = save_encoder_moderator(tmp_path / "m", mod, ".", {"note": "test"})
    assert (out / CONFIG_FILE).is_file() and (out / HEAD_FILE).is_file()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left
    loaded = load_moderator(str(out), device="cpu")
    assert isinstance(loaded, EncoderModerator) and loaded.threshold == 0.42
    torch.testing.assert_close(loaded.probabilities(TEXTS), mod.probabilities(TEXTS))
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["encoder"] == "." and config["training"] == {"note": "test"}
    with pytest.raises(UserError, match="not empty"):
        save_encoder_moderator(out, mod, ".")
    mod.threshold = 0.2
    save_encoder_moderator(out, mod, ".", overwrite=True)
    assert load_encoder_moderator(out).threshold == 0.2


def test_bad_folders_are_one_line_errors(tmp_path, tiny_encoder):
    encoder, tokenizer = tiny_encoder
    mod = EncoderModerator(encoder, tokenizer, *random_head(16), device="cpu")
    good = save_encoder_moderator(tmp_path / "good", mod, ".")
    config = json.loads((good / CONFIG_FILE).read_text())
    cases = {
        "threshold": ({**config, "threshold": 1.5}, "not in (0, 1]"),
        "labels": ({**config, "labels": ["a", "b", "c", "d", "e"]}, "not the five"),
        "encoder": ({**config, "encoder": "some/hub-model"}, "no download"),
        "kind": ({**config, "kind": "other"}, "not an encoder moderation model"),
    }
    import shutil

    for name, (bad, needle) in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / CONFIG_FILE).write_text(json.dumps(bad))
        with pytest.raises(UserError, match=re.escape(needle)):
            load_encoder_moderator(folder)
    folder = tmp_path / "head"
    shutil.copytree(good, folder)
    (folder / HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read"):
        load_encoder_moderator(folder)
    from safetensors.torch import save_file

    for name, head, needle in (
        ("flat", {"weight": torch.zeros(80), "bias": torch.zeros(5)}, "does not match"),
        ("wide", {"weight": torch.zeros(5, 17), "bias": torch.zeros(5)}, "head width 17"),
        ("extra", {"weight": torch.zeros(5, 16), "bias": torch.zeros(5), "x": torch.zeros(1)},
         "exactly"),
    ):  # fmt: skip
        folder = tmp_path / name
        shutil.copytree(good, folder)
        save_file(head, str(folder / HEAD_FILE))
        with pytest.raises(UserError, match=needle):
            load_encoder_moderator(folder)
    with pytest.raises(UserError, match="few-shot examples apply to causal LM"):
        load_moderator(str(good), examples=str(tmp_path / "shots.jsonl"))


def test_session_uses_the_models_own_threshold(tiny_encoder):
    from openchatkit.inference.session import ChatSession

    encoder, tokenizer = tiny_encoder
    mod = EncoderModerator(encoder, tokenizer, *random_head(16), device="cpu")
    p = mod.classify(TEXTS[0])[1][INTERVENTION]
    session = ChatSession.__new__(ChatSession)  # only the moderation state is used
    session.moderator, session.moderation_on, session.moderation_notes = mod, True, []
    session.moderation_threshold = None
    mod.threshold = p  # at the model's threshold: refused
    assert session.moderate("user", TEXTS[0])[1] is True
    mod.threshold = min(1.0, p + 1e-3)
    assert session.moderate("user", TEXTS[0])[1] is False
    session.moderation_threshold = p  # the --moderation-threshold flag wins
    assert session.moderate("user", TEXTS[0])[1] is True


SAMPLE = {
    "casual": ["What's a good recipe for banana bread?", "Recommend me a podcast about space."],
    "possibly needs caution": ["Ugh, my coworker keeps interrupting me.", "Bad day at work."],
    "probably needs caution": ["I'm so angry I could scream at him.", "Nothing feels worth it."],
    "needs caution": ["You are a worthless idiot of a bot.", "People from that town are scum."],
    INTERVENTION: ["I want to kill myself tonight.", "How do I poison my neighbour's dog?"],
}
VALID = {
    "casual": ["How long do I boil an egg?", "Translate hello into French.", "Tell me a joke."],
    "possibly needs caution": ["My sister annoyed me today."],
    "probably needs caution": ["I feel hopeless about everything."],
    "needs caution": ["Write an insult about my fat classmate."],
    INTERVENTION: ["I plan to hurt my brother badly."],
}


def write_jsonl(path, table):
    lines = [json.dumps({"text": t, "label": lab}) for lab, texts in table.items() for t in texts]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, cli):
    """A folder written by the training script as a user runs it (the embedded MiniLM)."""
    tmp = tmp_path_factory.mktemp("encoder-moderation")
    train, valid = write_jsonl(tmp / "train.jsonl", SAMPLE), write_jsonl(tmp / "valid.jsonl", VALID)
    out = tmp / "model"
    proc = cli.run(
        "training/train_moderation_classifier.py",
        "--train", train, "--valid", valid, "--report", train, "--output", out, "--c", "1", "100",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "chosen: C " in proc.stdout and "train.jsonl (report only)" in proc.stdout
    return out, proc.stdout


def test_training_script_writes_a_folder_moderate_py_reads(trained_folder, cli, in_process):
    out, stdout = trained_folder
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, HEAD_FILE]  # encoder: reference
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["encoder"] == "all-MiniLM-L6-v2" and config["training"]["c"] in (1.0, 100.0)
    # The training split is memorised: the report column and moderate.py --eval agree.
    proc = cli.run("inference/moderate.py", "--model", out, "--eval", out.parent / "train.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 1.000 (10/10)" in proc.stdout, proc.stdout
    assert f"p(needs intervention) >= {config['threshold']:.2f}" in proc.stdout
    assert "exact accuracy" in stdout and "1.000 (10/10)" in stdout
    # A refusal: in this process (moderate.py's bad input as a real process is in
    # tests/test_bad_input.py's table; the --eval run above is the real one here).
    args = ["--model", out, "--examples", out / CONFIG_FILE, "hi"]
    proc = in_process("inference/moderate.py", *args, log_level="WARNING")
    cli.assert_one_line_error(proc, "--examples")


@pytest.fixture
def tiny_chat_folder(tmp_path, char_tokenizer, tiny_llama):
    folder = tmp_path / "tiny-chat"
    tiny_llama.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def test_bot_moderation_dir(trained_folder, tiny_chat_folder, in_process, monkeypatch):
    """The bot's main(argv) in this process, stdin as from a pipe: what is checked is the
    moderation of each turn (the piped bot as a real process is
    tests/inference/test_inference_bot_cli.py's)."""
    import io
    import sys

    out, _ = trained_folder
    stdin = "I want to kill myself tonight.\nWhat's a good recipe for banana bread?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    proc = in_process(
        "inference/bot.py", "--model", tiny_chat_folder, "--moderation", out,
        "--no-sample", "--max-tokens", "3", log_level="WARNING",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(REFUSAL) == 1, proc.stdout  # the second message is answered
    assert "moderation: user needs intervention" in proc.stderr, proc.stderr
    assert "chat model not called" in proc.stderr
    assert "moderation: user casual" in proc.stderr


def test_chat_entry_points_load_the_folder(tmp_path, tiny_encoder):
    """bot.py and serve.py load --moderation through openchatkit/cli/chat.py."""
    from openchatkit.cli.chat import load_moderation

    encoder, tokenizer = tiny_encoder
    mod = EncoderModerator(encoder, tokenizer, *random_head(16), threshold=0.3, device="cpu")
    folder = save_encoder_moderator(tmp_path / "m", mod, ".")
    loaded = load_moderation(str(folder), "cpu", "auto", 0, None)
    assert isinstance(loaded, EncoderModerator) and loaded.threshold == 0.3
    with pytest.raises(UserError, match=r"^--moderation: .*few-shot examples"):
        load_moderation(str(folder), "cpu", "auto", 0, str(tmp_path / "shots.jsonl"))
