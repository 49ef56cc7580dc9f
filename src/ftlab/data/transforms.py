"""Eval transforms from the backbone's pretrained config; train augmentation as named presets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torchvision import transforms as T

AUGMENT_PRESETS = ("none", "basic", "strong")


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        return T.InterpolationMode.BICUBIC


def eval_geometry(cfg: dict[str, Any]) -> T.Compose:
    """The deterministic PIL part of :func:`eval_transform`: a ``size`` x ``size`` RGB image out."""
    size = cfg["size"]
    interp = _interpolation(cfg["interpolation"])
    resize = int(math.floor(size / cfg["crop_pct"]))
    return T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size)])


def to_normalized_tensor(cfg: dict[str, Any]) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


def eval_transform(cfg: dict[str, Any]) -> T.Compose:
    """Resize to ``size / crop_pct`` then centre-crop ``size``, as the backbone was evaluated."""
    # Split in two so data.cache can store the geometry's output and apply only the tensor part.
    return T.Compose([*eval_geometry(cfg).transforms, *to_normalized_tensor(cfg).transforms])


def train_transform(
    cfg: dict[str, Any],
    augment: str = "basic",
    hflip: bool = True,
    crop_scale: Sequence[float] = (0.08, 1.0),
) -> T.Compose:
    """``none`` = eval pipeline; ``basic`` = random resized crop (+ flip); ``strong`` adds TrivialAugment."""
    if augment == "none":
        return eval_transform(cfg)
    size = cfg["size"]
    interp = _interpolation(cfg["interpolation"])
    steps: list = [T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=interp)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment == "strong":
        steps.append(T.TrivialAugmentWide(interpolation=interp))
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)
