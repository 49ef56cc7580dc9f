"""Eval transforms from the backbone's pretrained config; train augmentation as named presets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
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


class ToNormalizedTensor:
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` in one step: the same float32 operations in the same
    order, so the same values, in about half the time per image (the two transforms' per-call checks and
    copies cost more than their arithmetic on small images). Anything but an 8-bit RGB PIL image goes
    through the two torchvision transforms."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if not all(self.std):
            raise ValueError(f"std={self.std}: a zero standard deviation would divide by zero")
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._general = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, pic: Any) -> torch.Tensor:
        if not isinstance(pic, Image.Image) or pic.mode != "RGB" or torch.get_default_dtype() != torch.float32:
            return self._general(pic)
        chw = torch.from_numpy(np.array(pic, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return chw.to(torch.float32).div(255).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def to_normalized_tensor(cfg: dict[str, Any]) -> T.Compose:
    return T.Compose([ToNormalizedTensor(cfg["mean"], cfg["std"])])


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
    steps.append(ToNormalizedTensor(cfg["mean"], cfg["std"]))
    return T.Compose(steps)
