"""Data: digits materialisation, ImageFolder discovery/splits, transforms, and user errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftlab.data import DigitsDataModule, ImageFolderDataModule, load_rgb, materialize_digits
from ftlab.errors import UserError
from helpers import make_imagefolder

PREPROC = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "crop_pct": 1.0}


def _count(folder: Path) -> Counter:
    return Counter(p.parent.name for p in folder.rglob("*.png"))


def test_digits_materialised_with_fixed_stratified_split(digits_dir: Path) -> None:
    counts = {s: _count(digits_dir / s) for s in ("train", "val", "test")}
    total = sum(sum(c.values()) for c in counts.values())
    assert total == 1797
    assert sorted(counts["train"]) == [str(d) for d in range(10)]
    fractions = {s: sum(c.values()) / total for s, c in counts.items()}
    assert fractions["train"] == pytest.approx(0.70, abs=0.02)
    assert fractions["val"] == pytest.approx(0.15, abs=0.02)
    assert fractions["test"] == pytest.approx(0.15, abs=0.02)
    # Stratified: every class appears in every split in roughly the same proportion.
    for split, c in counts.items():
        assert min(c.values()) >= 0.8 * sum(c.values()) / 10, split
    img = Image.open(next((digits_dir / "test" / "3").glob("*.png")))
    assert img.size == (8, 8)
    assert np.asarray(img).max() > 200  # real ink, scaled from 0..16 to 0..255


def test_digits_split_is_deterministic_and_disjoint(digits_dir: Path, tmp_path: Path) -> None:
    again = materialize_digits(tmp_path / "digits")
    for split in ("train", "val", "test"):
        a = sorted(p.relative_to(digits_dir) for p in (digits_dir / split).rglob("*.png"))
        b = sorted(p.relative_to(again) for p in (again / split).rglob("*.png"))
        assert a == b
    names = [{p.name for p in (digits_dir / s).rglob("*.png")} for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_digits_materialisation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash half-way leaves neither the target nor a temp folder; the next call completes."""
    target = tmp_path / "digits"
    calls = {"n": 0}
    original = Image.Image.save

    def flaky_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        materialize_digits(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", original)
    materialize_digits(target)
    assert sum(1 for _ in target.rglob("*.png")) == 1797


def test_digits_datamodule_reads_pngs_through_imagefolder(digits_dir: Path) -> None:
    dm = DigitsDataModule(root=str(digits_dir), batch_size=16, num_workers=0, image_size=32, augment="none", hflip=False)
    assert dm.num_classes == 10
    dm.set_preprocessing(PREPROC)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,)
    assert isinstance(dm.datasets["train"].samples[0][0], str) and dm.datasets["train"].samples[0][0].endswith(".png")


def test_val_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=20)
    dm = ImageFolderDataModule(str(root), val_fraction=0.25, seed=1, num_workers=0)
    dm.discover()
    assert dm.split_sizes() == {"train": 45, "val": 15, "test": 15}
    assert Counter(y for _, y in dm._splits["val"]) == {0: 5, 1: 5, 2: 5}
    assert dm.test_on_val
    dm2 = ImageFolderDataModule(str(root), val_fraction=0.25, seed=1, num_workers=0)
    dm2.discover()
    assert dm2._splits["val"] == dm._splits["val"]
    dm3 = ImageFolderDataModule(str(root), val_fraction=0.25, seed=2, num_workers=0)
    dm3.discover()
    assert dm3._splits["val"] != dm._splits["val"]


def test_explicit_val_and_test_folders_are_used(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(str(root), num_workers=0)
    assert dm.discover() == ["cat", "dog", "fox"]
    assert dm.split_sizes() == {"train": 12, "val": 12, "test": 12}
    assert not dm.test_on_val


def test_class_missing_from_train_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4, splits=("train",))
    make_imagefolder(root, classes=("cat", "wolf"), per_class=2, splits=("test",))
    with pytest.raises(UserError, match="wolf"):
        ImageFolderDataModule(str(root), num_workers=0).discover()


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    (root / "train" / "emu").mkdir()
    with pytest.raises(UserError, match="emu.*no images"):
        ImageFolderDataModule(str(root), num_workers=0).discover()


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        ImageFolderDataModule(str(root), num_workers=0).discover()


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no/such"):
        ImageFolderDataModule(str(tmp_path / "no" / "such"), num_workers=0).discover()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_pil_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.new("RGB", (6, 5), (10, 120, 240))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((5, 6), 40000, np.uint16))
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (6, 5)
    if mode == "I;16":
        assert 150 < np.asarray(out)[0, 0, 0] < 160  # 40000/65535*255, not clipped to 255


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif)
    assert load_rgb(str(path)).size == (4, 8)


def test_augment_presets(tmp_path: Path) -> None:

    from ftlab.data.transforms import ToNormalizedTensor, train_transform

    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "RandomResizedCrop" not in names(train_transform(PREPROC, "none"))
    assert names(train_transform(PREPROC, "basic", hflip=True))[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert "RandomHorizontalFlip" not in names(train_transform(PREPROC, "basic", hflip=False))
    assert "TrivialAugmentWide" in names(train_transform(PREPROC, "strong"))
    assert isinstance(train_transform(PREPROC, "none").transforms[-1], ToNormalizedTensor)
    assert isinstance(train_transform(PREPROC, "strong").transforms[-1], ToNormalizedTensor)
    with pytest.raises(UserError, match="augment"):
        ImageFolderDataModule(str(tmp_path), augment="heavy")


def test_to_normalized_tensor_equals_torchvisions_two_transforms() -> None:
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from ftlab.data.transforms import ToNormalizedTensor

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    fused, two = ToNormalizedTensor(mean, std), T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (7, 13), (1, 1), (224, 160)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        out = fused(img)
        assert out.dtype == torch.float32 and out.shape == (3, h, w) and out.is_contiguous()
        assert torch.equal(out, two(img))  # bit for bit, not approximately
    grey = Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8), "L")
    one = ToNormalizedTensor((0.5,), (0.25,))
    assert torch.equal(one(grey), T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.25,))])(grey))
    with pytest.raises(ValueError, match="std"):
        ToNormalizedTensor(mean, (0.2, 0.0, 0.2))


def test_inference_workers_leave_torch_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftlab.data import workers

    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert workers.inference_workers("auto", on_cpu=True) == 0  # torch's threads take both cores
    assert workers.inference_workers("auto", on_cpu=False) == 1  # the network runs elsewhere (GPU)
    assert workers.inference_workers(3, on_cpu=True) == 3  # a number is taken as given
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert workers.inference_workers("auto", on_cpu=True) == 8
    with pytest.raises(UserError):
        workers.inference_workers("many", on_cpu=True)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the loaders are built, never iterated
@pytest.mark.parametrize("cores,threads,expected", [(2, 2, 0), (16, 8, 8), (8, 2, 6)])
def test_test_split_on_the_cpu_uses_the_cores_torch_leaves_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, threads: int, expected: int
) -> None:
    """data.num_workers=auto: train and val keep cores - 1 workers; the test split, read once, gets the cores
    torch's threads leave free. An explicit number is used for every split."""
    root = make_imagefolder(tmp_path / "d", per_class=4, splits=("train", "val", "test"))
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    auto = ImageFolderDataModule(str(root), num_workers="auto", image_size=32, check_images=False)
    fixed = ImageFolderDataModule(str(root), num_workers=1, image_size=32, check_images=False)
    for dm in (auto, fixed):
        dm.set_preprocessing({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                              "crop_pct": 1.0})
        dm.setup("fit")
    assert auto.train_dataloader().num_workers == auto.val_dataloader().num_workers == min(8, cores - 1)
    assert auto.test_dataloader().num_workers == expected
    assert fixed.train_dataloader().num_workers == fixed.test_dataloader().num_workers == 1
