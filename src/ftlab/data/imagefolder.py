"""ImageFolder data: ``root/train`` (+ optional ``val``/``test``), one sub-folder per class."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ftlab.data.base import SplitDataModule
from ftlab.data.digits import materialize_digits
from ftlab.data.feature_cache import check_cache_features
from ftlab.data.folds import check_fold_args, stratified_fold
from ftlab.data.image_cache import cached_datasets
from ftlab.data.image_check import BAD_IMAGE_POLICIES, CheckCache, screen
from ftlab.data.images import ImageListDataset, Sample, list_classes, scan_split
from ftlab.data.imbalance import SAMPLERS
from ftlab.data.mixup import check_mixup_args
from ftlab.data.transforms import AUGMENT_PRESETS, eval_transform, train_transform
from ftlab.data.workers import CAN_FORK, resolve_workers
from ftlab.errors import UserError
from ftlab.validate import BOOLEAN, NON_NEGATIVE, POSITIVE_INT, WORKERS, Check, integer, number, one_of

log = logging.getLogger(__name__)

class ImageFolderDataModule(SplitDataModule):
    """Train/val/test loaders over an ImageFolder tree.

    No ``val/``: a stratified ``val_fraction`` split of ``train/`` (seeded). No ``test/``: the
    test stage uses val, and says so. Eval preprocessing comes from the backbone
    (:meth:`set_preprocessing`); ``image_size``/``crop_pct`` override it.
    """

    # data.<key> -> check, applied before any work (ftlab.validate).
    config_checks: ClassVar[dict[str, Check]] = {
        "batch_size": POSITIVE_INT,
        "val_fraction": (lambda v: number(v) and 0 < v < 1, "in (0, 1)"),
        "image_size": (lambda v: v is None or (integer(v) and v >= 8), "null or an integer >= 8"),
        "crop_pct": (lambda v: v is None or (number(v) and 0 < v <= 1), "null or in (0, 1]"),
        "crop_scale": (lambda v: len(v) == 2 and all(number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
                       "[min, max] with 0 < min <= max <= 1"),
        "num_workers": WORKERS,
        "augment": one_of(*AUGMENT_PRESETS),
        "hflip": BOOLEAN,
        "check_images": BOOLEAN,
        "on_bad_image": one_of(*BAD_IMAGE_POLICIES),
        "check_cache": BOOLEAN,
        "check_cache_dir": (lambda v: v is None or (isinstance(v, str) and bool(v.strip())), "null or a folder"),
        "cache": BOOLEAN,
        "cache_features": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
        "sampler": one_of(*SAMPLERS),
        "drop_last": BOOLEAN,
        "mixup": NON_NEGATIVE,
        "cutmix": NON_NEGATIVE,
        "mixup_prob": (lambda v: number(v) and 0 < v <= 1, "in (0, 1]"),
        "mixup_switch_prob": (lambda v: number(v) and 0 <= v <= 1, "in [0, 1]"),
    }

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        num_workers: int | str = "auto",
        image_size: int | None = None,
        crop_pct: float | None = None,
        augment: str = "basic",
        hflip: bool = True,
        crop_scale: Sequence[float] = (0.08, 1.0),
        seed: int = 0,
        check_images: bool = True,
        folds: int | None = None,
        fold: int | None = None,
        on_bad_image: str = "error",
        cache: bool = False,
        cache_features: bool | str = "auto",
        sampler: str = "shuffle",
        drop_last: bool = True,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        check_cache: bool = True,
        check_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if augment not in AUGMENT_PRESETS:
            raise UserError(f"data.augment={augment!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            choices = ", ".join(BAD_IMAGE_POLICIES)
            raise UserError(f"data.on_bad_image={on_bad_image!r}: choose one of {choices}")
        if on_bad_image == "skip" and not check_images:
            raise UserError("data.on_bad_image=skip needs data.check_images=true (the check finds bad files)")
        # error: the first unusable image stops the run before training; skip: drop them with one warning.
        self.on_bad_image = on_bad_image
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = resolve_workers(num_workers)
        self.auto_workers = num_workers == "auto"
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.augment = augment
        self.hflip = hflip
        self.crop_scale = tuple(crop_scale)
        self.seed = seed
        self.check = check_images
        # Remember what the check found (ftlab.data.image_check.CheckCache): beside the data when the folder
        # is writable, else under check_cache_dir (the configs: the output root's image_check/).
        self.check_cache = check_cache
        self.check_cache_dir = check_cache_dir
        # Decode every image once in setup and serve samples from memory (ftlab.data.image_cache).
        self.cache = cache
        # Train the head on the frozen backbone's outputs, computed once (ftlab.data.feature_cache);
        # ftlab.train attaches the cache when this allows it and the run makes it valid.
        self.cache_features = check_cache_features(cache_features)
        # Cross-validation (ftlab.crossval): with `fold` set, train/val are fold `fold` of `folds`
        # stratified folds over train+val pooled; the test split is untouched.
        check_fold_args(folds, fold)
        self.folds = folds
        self.fold = fold
        # data.sampler=balanced: classes drawn equally often (ftlab.data.imbalance); data.drop_last: no short
        # last train batch (ftlab.data.base).
        if sampler not in SAMPLERS:
            raise UserError(f"data.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.drop_last = drop_last
        # Mixup/CutMix on training batches (ftlab.data.mixup; ftlab.train hands the mixer to the module).
        check_mixup_args(mixup, cutmix, batch_size)
        self.mixup = mixup
        self.cutmix = cutmix
        self.mixup_prob = mixup_prob
        self.mixup_switch_prob = mixup_switch_prob
        self.classes: list[str] = []
        self.preprocessing: dict[str, Any] | None = None
        self.test_on_val = False
        self._splits: dict[str, list[Sample]] = {}

    # -- discovery -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download for a user folder; subclasses materialise built-in data here."""

    def discover(self) -> list[str]:
        """Scan the tree once: classes from ``train/``, samples of every split, sanity checks."""
        if self._splits:
            return self.classes
        if not self.root.exists():
            raise UserError(f"data.root={self.root}: no such directory")
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise UserError(f"data.root={self.root}: expected a 'train/' folder with one sub-folder per class")
        self.classes = list_classes(train_dir)
        if not self.classes:
            raise UserError(f"{train_dir}: no class folders (expected train/<class>/<image>)")
        if len(self.classes) < 2:
            raise UserError(f"{train_dir}: found one class ('{self.classes[0]}'); a classifier needs at least two")
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        train = scan_split(train_dir, class_to_idx)
        given = {s: scan_split(self.root / s, class_to_idx) for s in ("val", "test") if (self.root / s).is_dir()}
        if self.check:
            # Before splitting, so a skipped file never leaves a class without validation images.
            train, given = self._screen(train, given)
        val = given["val"] if "val" in given else None
        if val is None:
            train, val = self._split(train)
        if self.folds and self.fold is not None:
            train, val = stratified_fold(train + val, self.folds, self.fold, self.seed, self.classes)
        if "test" in given:
            test = given["test"]
        else:
            test = val
            self.test_on_val = True
            log.warning("%s has no test/ folder: testing on the validation split", self.root)
        if not val:
            raise UserError(f"{self.root / 'val'}: no images")
        self._splits = {"train": train, "val": val, "test": test}
        return self.classes

    def _screen(
        self, train: list[Sample], given: dict[str, list[Sample]]
    ) -> tuple[list[Sample], dict[str, list[Sample]]]:
        """Apply data.on_bad_image to every split at once (one warning for the whole tree)."""
        splits = {"train": train, **given}
        cache = CheckCache(self.root, self.check_cache_dir) if self.check_cache else None
        kept = set(screen([s for samples in splits.values() for s in samples], self.on_bad_image, cache))
        if len(kept) == sum(len(v) for v in splits.values()):
            return train, given
        out = {name: [s for s in samples if s in kept] for name, samples in splits.items()}
        left = {y for _, y in out["train"]}
        for c, cls in enumerate(self.classes):
            if c not in left:
                folder = self.root / "train" / cls
                raise UserError(f"{folder}: no readable images left after data.on_bad_image=skip")
        for name in given:
            if not out[name]:
                raise UserError(f"{self.root / name}: no readable images left after data.on_bad_image=skip")
        return out.pop("train"), out

    def _split(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        labels = [y for _, y in samples]
        # At least one image of every class in val, however small the fraction.
        n_val = max(len(self.classes), int(round(self.val_fraction * len(samples))))
        try:
            from sklearn.model_selection import train_test_split

            tr, va = train_test_split(samples, test_size=n_val, stratify=labels, random_state=self.seed)
        except ValueError as exc:
            raise UserError(
                f"{self.root / 'train'}: cannot split off data.val_fraction={self.val_fraction} "
                f"stratified by class ({exc}); add a val/ folder or more images per class"
            ) from None
        return list(tr), list(va)

    @property
    def num_classes(self) -> int:
        return len(self.discover())

    def split_sizes(self) -> dict[str, int]:
        self.discover()
        return {k: len(v) for k, v in self._splits.items()}

    # -- transforms ------------------------------------------------------------------------
    def set_preprocessing(self, backbone_cfg: dict[str, Any]) -> None:
        """Adopt the backbone's pretrained preprocessing, with this module's overrides applied."""
        if backbone_cfg.get("modality") == "text":
            raise UserError(f"data.root={self.root}: this is image data, and the model reads text; choose text data "
                            "(data=rotten_tomatoes, data=textfile, data=textfolder) or an image model")
        cfg = dict(backbone_cfg)
        if self.image_size:
            cfg["size"] = int(self.image_size)
        if self.crop_pct:
            cfg["crop_pct"] = float(self.crop_pct)
        self.preprocessing = cfg

    def _transforms(self) -> tuple[Any, Any]:
        if self.preprocessing is None:
            raise RuntimeError("set_preprocessing() must be called with the backbone's data config first")
        return (
            train_transform(self.preprocessing, self.augment, self.hflip, self.crop_scale),
            eval_transform(self.preprocessing),
        )

    def setup(self, stage: str | None = None) -> None:
        self.discover()
        train_tf, eval_tf = self._transforms()
        if self.cache:
            # One copy per process of this machine (DDP ranks each build theirs): the memory check counts all.
            local = getattr(self.trainer, "num_devices", 1) if self.trainer is not None else 1
            transforms = {"train": train_tf, "val": eval_tf, "test": eval_tf}
            self.datasets = cached_datasets(
                self._splits, transforms, self.preprocessing, resized=self.augment == "none", processes=local
            )
            return
        self.datasets = {
            "train": ImageListDataset(self._splits["train"], train_tf),
            "val": ImageListDataset(self._splits["val"], eval_tf),
            "test": ImageListDataset(self._splits["test"], eval_tf),
        }

    # -- loaders (ftlab.data.base) -----------------------------------------------------------
    def loader_options(self) -> dict[str, Any]:
        # Forked workers share data.cache's buffer copy-on-write; spawn/forkserver (the default from
        # Python 3.14) would pickle a copy of it into every worker.
        return {"multiprocessing_context": "fork" if self.cache and self.num_workers > 0 and CAN_FORK else None}


class DigitsDataModule(ImageFolderDataModule):
    """scikit-learn's 1,797 handwritten digit scans, written once as PNGs under ``root``."""

    def prepare_data(self) -> None:
        materialize_digits(self.root)

    def discover(self) -> list[str]:
        if not self._splits:
            self.prepare_data()
        return super().discover()
