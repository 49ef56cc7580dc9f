"""What tests share besides fixtures: tiny model/trainer overrides, toy image folders, paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ftlab.config import CONFIG_DIR

REPO = Path(CONFIG_DIR).parent
# A tiny timm network (~0.5M params) keeps end-to-end tests to seconds.
TINY_MODEL = ["model=timm", "model.name=test_resnet", "model.pretrained=false", "data.image_size=32"]
FAST_TRAINER = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0"]


def make_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 10,
    splits: tuple[str, ...] = ("train",),
    size: int = 20,
) -> Path:
    """Write a learnable toy dataset: each class is a distinct colour with noise."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 200
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


# For subprocesses started by tests: the same reason as `one_thread`.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
