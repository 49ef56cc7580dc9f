"""Stratified K-fold splits for cross-validation (``data.folds=K``; see :mod:`ftlab.crossval`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from ftlab.errors import UserError

Sample = tuple[str, int]


def check_fold_args(folds: int | None, fold: int | None) -> None:
    if folds is None:
        if fold is not None:
            raise UserError(f"data.fold={fold}: needs data.folds (the number of folds)")
        return
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise UserError(f"data.folds={folds!r}: must be null or an integer >= 2")
    if fold is not None and not (isinstance(fold, int) and 0 <= fold < folds):
        raise UserError(f"data.fold={fold!r}: must be in 0..{folds - 1} (data.folds={folds})")


def stratified_fold(
    samples: Sequence[Sample], folds: int, fold: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Fold ``fold`` of ``folds``: (train, val). Seeded, stratified, independent of the input order."""
    pool = sorted(samples)  # the same folds whatever order the files were listed or split in
    counts = Counter(y for _, y in pool)
    small = [(y, n) for y, n in sorted(counts.items()) if n < folds]
    if small:
        y, n = small[0]
        name = class_names[y] if class_names else str(y)
        raise UserError(
            f"data.folds={folds}: class '{name}' has {n} image(s) in train+val; every fold needs at least one "
            f"of each class in its validation part (use fewer folds)"
        )
    labels = np.array([y for _, y in pool])
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return [pool[i] for i in train_idx], [pool[i] for i in val_idx]
