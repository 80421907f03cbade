"""The Gutenberg book corpus: its `MANIFEST.tsv`, its train/validation/test splits, and the
books' text.

The corpus folder (`../shared/data/gutenberg/` beside the checkout, or `$SPECATTN_DATA_DIR`)
holds one UTF-8 text file per book and a tab-separated `MANIFEST.tsv` with the columns
`file, gutenberg_id, title, author, chars, sha256, split, source, split_basis`.

Everything here is plain Python, so training on a machine without `datasets` works;
`load_split_dataset` wraps a split as a `datasets.Dataset` for the evaluation code.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path

from specattn_jax.errors import SpecAttnError

SPLITS = ("train", "validation", "test")
MANIFEST = "MANIFEST.tsv"
_REQUIRED_COLUMNS = ("file", "gutenberg_id", "title", "author", "chars", "sha256", "split")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Book:
    """One row of the manifest; `path` is the text file."""

    file: str
    gutenberg_id: int
    title: str
    author: str
    chars: int
    sha256: str
    split: str
    path: Path

    def read(self, *, verify: bool = False) -> str:
        """The book's text; with `verify`, checks the file's sha256 against the manifest."""
        if not self.path.is_file():
            raise SpecAttnError(f"{self.path} is listed in the manifest but missing")
        data = self.path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != self.sha256:
            raise SpecAttnError(f"{self.path}: sha256 differs from the manifest's {self.sha256}")
        return data.decode("utf-8")


def default_data_dir() -> Path:
    """`$SPECATTN_DATA_DIR` if set, else `../shared/data/gutenberg` beside the checkout."""
    if "SPECATTN_DATA_DIR" in os.environ:
        return Path(os.environ["SPECATTN_DATA_DIR"]).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg"


def read_manifest(data_dir: str | Path | None = None) -> list[Book]:
    """Every book of the manifest, in manifest order."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    manifest = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise SpecAttnError(
            f"the corpus folder {data_dir} does not exist: point SPECATTN_DATA_DIR (or "
            f"--data-dir) at the Gutenberg corpus folder, the one holding {MANIFEST}"
        )
    if not manifest.is_file():
        raise SpecAttnError(f"no {MANIFEST} in {data_dir}: is this the Gutenberg corpus folder?")
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    missing = [c for c in _REQUIRED_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise SpecAttnError(f"{manifest} has no rows or lacks the columns {missing}")
    books = []
    for row in rows:
        if row["split"] not in SPLITS:
            raise SpecAttnError(f"{manifest}: {row['file']} has split {row['split']!r}")
        books.append(
            Book(
                file=row["file"],
                gutenberg_id=int(row["gutenberg_id"]),
                title=row["title"],
                author=row["author"],
                chars=int(row["chars"]),
                sha256=row["sha256"],
                split=row["split"],
                path=data_dir / row["file"],
            )
        )
    return books


def split_books(split: str, data_dir: str | Path | None = None) -> list[Book]:
    """The books of one split ("train", "validation" or "test"), in manifest order."""
    if split not in SPLITS:
        raise SpecAttnError(f"split={split!r} is not one of {SPLITS}")
    books = [book for book in read_manifest(data_dir) if book.split == split]
    if not books:
        raise SpecAttnError(f"the manifest in {data_dir} has no {split!r} books")
    return books


def load_split_texts(
    split: str, data_dir: str | Path | None = None, *, verify: bool = False
) -> list[str]:
    """The texts of one split's books, in manifest order."""
    return [book.read(verify=verify) for book in split_books(split, data_dir)]


def load_split_dataset(split: str, data_dir: str | Path | None = None, *, verify: bool = False):
    """One split as a `datasets.Dataset` with columns file, gutenberg_id, title, author, text."""
    import datasets

    books = split_books(split, data_dir)

    def rows():
        for book in books:
            yield {
                "file": book.file,
                "gutenberg_id": book.gutenberg_id,
                "title": book.title,
                "author": book.author,
                "text": book.read(verify=verify),
            }

    return datasets.Dataset.from_list(list(rows()))
