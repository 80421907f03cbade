"""A Gutenberg-shaped corpus of sentences from a small grammar, for the training tests:
learnable, so a loss must fall within a few dozen steps on CPU."""

import hashlib
from pathlib import Path

import numpy as np

_WORDS = (
    "the a man woman ship sea house night old young dark long went saw said came looked "
    "into upon over under and but while when quietly slowly".split()
)
SPLITS = ("train", "train", "validation", "train", "test")


def book(seed: int, sentences: int = 400) -> str:
    """Sentences from the grammar, four to a line."""
    rng = np.random.default_rng(seed)
    nouns, verbs, adjectives = _WORDS[2:8], _WORDS[12:17], _WORDS[8:12]
    lines = []
    for _ in range(sentences):
        subject = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        obj = f"{rng.choice(['the', 'a'])} {rng.choice(nouns)}"
        lines.append(
            f"{subject.capitalize()} {rng.choice(verbs)} {obj} {rng.choice(_WORDS[17:21])} night."
        )
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


def write_corpus(root: Path) -> Path:
    """MANIFEST.tsv and 3 train, 1 validation, 1 test book under `root`."""
    header = "file\tgutenberg_id\ttitle\tauthor\tchars\tsha256\tsplit\tsource\tsplit_basis"
    rows = [header]
    for i, split in enumerate(SPLITS):
        text = book(i)
        name = f"pg{i}.txt"
        (root / name).write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        rows.append(
            f"{name}\t{i}\tBook {i}\tAuthor\t{len(text)}\t{digest}\t{split}\tsynthetic\tnone"
        )
    (root / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    return root
