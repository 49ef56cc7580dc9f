"""Image files: listing them, decoding them upright as RGB, and datasets over them.

Everything that reads images goes through here: the DataModule (:mod:`ftlab.data.imagefolder`), the
in-memory cache, the upfront check, ``ftlab eval`` and ``ftlab predict``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ftlab.data.workers import resolve_workers
from ftlab.errors import UserError

# (path, class index)
Sample = tuple[str, int]


def load_rgb(path: str) -> Image.Image:
    """Open any PIL-readable image upright (EXIF orientation applied) as RGB."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("P", "LA", "PA") or (img.mode == "RGBA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        elif img.mode.startswith("I") or img.mode == "F":
            # 16-bit / float grayscale: rescale to 8 bits instead of clipping.
            img = img.point(lambda v: v * (255.0 / 65535.0)).convert("L")
        return img.convert("RGB")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_classes(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_split(split_dir: Path, class_to_idx: dict[str, int]) -> list[Sample]:
    """All images under ``split_dir/<class>/``; a class unknown to train or with no images is an error."""
    samples: list[Sample] = []
    for cls in list_classes(split_dir):
        if cls not in class_to_idx:
            raise UserError(f"{split_dir / cls}: class '{cls}' is not in the train split")
        files = sorted(
            os.path.join(dp, f)
            for dp, _, fs in os.walk(split_dir / cls, followlinks=True)
            for f in fs
            if is_image(f)
        )
        if not files:
            raise UserError(f"{split_dir / cls}: class folder has no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        samples += [(f, class_to_idx[cls]) for f in files]
    return samples


def list_images(input_path: str) -> list[str]:
    """One file as given, or every image under a folder (recursively, sorted, by extension)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise UserError(f"input={input_path}: no such file or folder")
    files = sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(path, followlinks=True)
        for name in names
        if is_image(name) and not name.startswith(".")
    )
    if not files:
        raise UserError(f"input={input_path}: no images ({', '.join(IMG_EXTENSIONS[:5])}, ...) under it")
    return files


class ImageListDataset(Dataset):
    """(image, label) pairs for training and evaluation; a bad file raises (the upfront check finds them)."""

    def __init__(self, samples: Sequence[Sample], transform: Any = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class ImageFiles(Dataset):
    """Images by path for inference: an unreadable file comes back as its error message instead of raising,
    so one bad file among thousands is reported rather than ending the run."""

    def __init__(self, paths: list[str], transform: Any) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(load_rgb(self.paths[i])), i, None
        except Exception as exc:  # PIL raises many types for bad files
            return None, i, f"{type(exc).__name__}: {exc}"


def collate_readable(
    items: list[tuple[torch.Tensor | None, int, str | None]],
) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """(stacked good images or None, their indices, [(index, error)] of the unreadable ones)."""
    good = [(x, i) for x, i, err in items if err is None]
    bad = [(i, err) for _, i, err in items if err is not None]
    stacked = torch.stack([x for x, _ in good]) if good else None
    return stacked, [i for _, i in good], bad


def readable_image_loader(paths: list[str], transform: Any, batch_size: int, num_workers: int | str) -> DataLoader:
    """Batches of :class:`ImageFiles` through :func:`collate_readable`."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be a positive integer")
    return DataLoader(ImageFiles(paths, transform), batch_size=batch_size,
                      num_workers=resolve_workers(num_workers, key="num_workers"), collate_fn=collate_readable)
