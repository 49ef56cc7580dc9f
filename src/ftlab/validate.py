"""Impossible values fail before any work starts, one line each, naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError

# key -> (check, what it must be)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.lr": (lambda v: v > 0, "> 0"),
    "model.backbone_lr_mult": (lambda v: v >= 0, ">= 0"),
    "model.weight_decay": (lambda v: v >= 0, ">= 0"),
    "model.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.image_size": (lambda v: v is None or (isinstance(v, int) and v >= 8), "null or an integer >= 8"),
    "data.crop_pct": (lambda v: v is None or 0 < v <= 1, "null or in (0, 1]"),
    "trainer.max_epochs": (lambda v: v is None or v == -1 or v > 0, "> 0 (or -1)"),
    "trainer.accumulate_grad_batches": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for the first key whose value is impossible."""
    for key, (ok, expected) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if value == "__absent__":
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise UserError(f"{key}={value!r}: must be {expected}")
