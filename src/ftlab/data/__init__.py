from ftlab.data.digits import materialize_digits
from ftlab.data.imagefolder import DigitsDataModule, ImageFolderDataModule, ImageListDataset, load_rgb

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "ImageListDataset", "load_rgb", "materialize_digits"]
