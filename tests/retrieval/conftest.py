"""Shared fixtures for the retrieval tests: one embedder per session, a generated corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Retrieval tests never touch the hub. Set per test, not at import: a module-level
    os.environ change would leak into every other test folder of the session."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# Made-up facts, each with a query that paraphrases it (few shared content words), and a key
# phrase that only the right passage contains.
FACTS = [
    (
        "Marrowby Bakery",
        "Marrowby Bakery in the village of Tillingfold bakes its bread in an oven heated by "
        "volcanic steam. The bakers rise at three in the morning.",
        "Which shop cooks loaves using heat from underground geothermal vents?",
        "volcanic steam",
    ),
    (
        "Kesterfield Observatory",
        "In 1931 the Kesterfield Observatory discovered a comet and named it after the "
        "astronomer's cat, Pepper. The comet returns every 88 years.",
        "What celestial object was named for a pet belonging to a stargazer?",
        "named it after the astronomer's cat",
    ),
    (
        "Fenwick Rails",
        "Fenwick Rails runs a night train from Dunmore to Cask Harbour. The journey lasts eleven "
        "hours and passengers sleep in wooden bunks.",
        "How long is the overnight railway trip to Cask Harbour?",
        "eleven hours",
    ),
    (
        "Ossory Choir",
        "The Ossory Choir sings only in the winter months. Every performance begins with a hymn "
        "about snow.",
        "Which singing group performs solely during the cold season?",
        "only in the winter months",
    ),
    (
        "Lindqvist Robotics",
        "Lindqvist Robotics builds underwater drones that inspect the hulls of cargo ships for "
        "cracks.",
        "Which firm makes submersible machines that check vessels for damage?",
        "underwater drones",
    ),
    (
        "Poppleton Zoo",
        "Poppleton Zoo keeps a seventy-year-old tortoise named Admiral that eats only dandelions.",
        "What elderly reptile at the animal park has a diet of yellow weeds?",
        "tortoise named Admiral",
    ),
    (
        "Greyhallow Library",
        "The Greyhallow Library lends musical instruments instead of books. Its most borrowed "
        "item is a cello.",
        "Where can people borrow violins and cellos rather than novels?",
        "lends musical instruments",
    ),
    (
        "Ashcombe cheese race",
        "Every May the town of Ashcombe sends wheels of cheddar rolling down Beacon Hill while "
        "runners chase them.",
        "Which event involves chasing dairy products down a slope?",
        "wheels of cheddar",
    ),
]

_FILLER_SUBJECTS = ["The committee", "A farmer", "The museum", "Our neighbour", "The council"]
_FILLER_VERBS = ["discussed", "painted", "repaired", "measured", "photographed"]
_FILLER_OBJECTS = [
    "the old fence",
    "a blue door",
    "the parking rules",
    "a wooden boat",
    "the garden wall",
]


def filler_documents(num: int, seed: int = 0) -> list[dict]:
    """Distractor documents of template sentences (deterministic)."""
    rng = random.Random(seed)
    docs = []
    for i in range(num):
        sentences = [
            f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_OBJECTS)} "
            f"on day {rng.randint(1, 300)}."
            for _ in range(6)
        ]
        docs.append({"title": f"Notes {i}", "text": " ".join(sentences)})
    return docs


def write_generated_corpus(folder: Path) -> Path:
    """A corpus folder with jsonl (facts + fillers), markdown and text files; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "facts.jsonl", "w") as f:
        for title, text, _, _ in FACTS:
            f.write(json.dumps({"title": title, "text": text}) + "\n")
        for doc in filler_documents(12):
            f.write(json.dumps(doc) + "\n")
    (folder / "guide.md").write_text(
        "# Garden guide\n\nTomatoes need six hours of sun. Water them in the morning.\n\n"
        "```python\nprint('not prose')\n```\n\n## Pests\n\nSlugs eat lettuce at night.\n"
    )
    (folder / "notes.txt").write_text("The tram to the harbour leaves every ten minutes.\n")
    return folder


@pytest.fixture(scope="session")
def facts():
    return FACTS


@pytest.fixture(scope="session")
def embedder():
    from openchatkit.retrieval import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def generated_index(tmp_path_factory, embedder):
    """(index folder, corpus folder) built once from the generated corpus, flat index."""
    from openchatkit.retrieval import build_index, read_corpus

    root = tmp_path_factory.mktemp("retrieval")
    corpus = write_generated_corpus(root / "corpus")
    out = root / "index"
    build_index(read_corpus([corpus]), out, embedder, progress=False)
    return out, corpus
