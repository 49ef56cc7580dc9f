"""Data: image folders (and the bundled digits), listing and decoding, caches, folds, resumable loading."""

from ftlab.data.digits import materialize_digits
from ftlab.data.imagefolder import DigitsDataModule, ImageFolderDataModule
from ftlab.data.images import ImageListDataset, Sample, list_classes, list_images, load_rgb, scan_split

__all__ = [
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageListDataset",
    "Sample",
    "list_classes",
    "list_images",
    "load_rgb",
    "materialize_digits",
    "scan_split",
]
