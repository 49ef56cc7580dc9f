"""Materialise scikit-learn's bundled handwritten digits as an ImageFolder tree, once and atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ftlab.fileio import atomic_dir

SPLITS = ("train", "val", "test")
# About 70/15/15, fixed so every run and every machine sees the same split.
SPLIT_SEED = 0
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


def materialize_digits(root: str | os.PathLike) -> Path:
    """Write ``root/{train,val,test}/<digit>/*.png`` from ``sklearn.datasets.load_digits``.

    The tree is built in a temporary sibling folder and renamed into place, so a run killed
    half-way never leaves a partial dataset behind. Existing complete trees are left alone.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    # Imported only when the tree is written: scikit-learn takes longer to import than the check above.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION / (1 - TEST_FRACTION),
        stratify=labels[rest],
        random_state=SPLIT_SEED,
    )
    with atomic_dir(root, lambda folder: (folder / "train").is_dir(), "exists but has no train/ folder") as tmp:
        for split, idx in zip(SPLITS, (train, val, test), strict=True):
            for i in idx:
                folder = tmp / split / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return root
