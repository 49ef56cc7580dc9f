"""data.on_bad_image: unusable files stop the run up front (error) or are dropped with one warning (skip)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftlab.data import ImageFolderDataModule
from ftlab.data.image_check import LIST_AT_MOST, image_problem
from ftlab.data.images import load_rgb
from ftlab.errors import UserError
from helpers import make_imagefolder


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    # Header intact (PIL's verify() passes it), entropy-coded data cut in half.
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _huge_png(path: Path) -> None:
    # 100 M pixels (over PIL's 89.5 M decompression-bomb limit) of 1-bit zeros: ~12 kB on disk.
    Image.new("1", (10_000, 10_000)).save(path)


BAD = {
    "truncated.jpg": _truncated_jpeg,
    "empty.png": lambda p: p.write_bytes(b""),
    "notes.jpg": lambda p: p.write_text("this is a text file with an image extension\n"),
    "huge.png": _huge_png,
}


def _odd_but_good(folder: Path) -> dict[str, tuple[int, int]]:
    """Files that must pass and load as RGB; returns the size each must load at."""
    Image.fromarray(np.full((12, 10), 40000, np.uint16)).save(folder / "deep16.png")
    Image.new("RGB", (10, 12), (10, 120, 240)).convert("CMYK").save(folder / "cmyk.jpg")
    palette = Image.new("RGB", (10, 12), (200, 20, 20)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(folder / "palette.png")
    Image.new("RGBA", (10, 12), (0, 200, 0, 128)).save(folder / "rgba.png")
    rotated = Image.new("RGB", (16, 8), (0, 0, 200))
    exif = rotated.getexif()
    exif[0x0112] = 6  # display rotated by 90°
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    return {"deep16.png": (10, 12), "cmyk.jpg": (10, 12), "palette.png": (10, 12), "rgba.png": (10, 12),
            "exif_rotated.jpg": (8, 16)}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_kind_stops_before_training_naming_the_file(tmp_path: Path, name: str) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    BAD[name](root / "train" / "dog" / name)
    dm = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(UserError, match=rf"train/dog/{name}: unreadable image") as err:
        dm.discover()
    assert "\n" not in str(err.value)
    if name == "huge.png":
        assert "decompression-bomb limit" in str(err.value)
    if name == "truncated.jpg":
        # The header-only check the data module used before would have let this through.
        with Image.open(root / "train" / "dog" / name) as img:
            img.verify()


def test_skip_drops_bad_files_with_one_warning_and_keeps_odd_good_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=6, splits=("train", "test"))
    folder = root / "train" / "cat"
    for name, make in BAD.items():
        make(folder / name)
    sizes = _odd_but_good(folder)
    (root / "test" / "fox" / "empty.png").write_bytes(b"")
    bad = [str(folder / n) for n in sorted(BAD)] + [str(root / "test" / "fox" / "empty.png")]

    dm = ImageFolderDataModule(str(root), num_workers=0, on_bad_image="skip", image_size=16, augment="none")
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        dm.discover()
    warnings = [r.getMessage() for r in caplog.records if "on_bad_image=skip" in r.getMessage()]
    assert len(warnings) == 1, warnings
    total = 3 * 6 + len(BAD) + len(sizes) + 3 * 6 + 1
    assert f"skipped {len(bad)} of {total} images" in warnings[0]
    assert all(path in warnings[0] for path in bad)

    kept = {p for split in ("train", "val", "test") for p, _ in dm._splits[split]}
    assert not kept & set(bad)
    assert {str(folder / n) for n in sizes} <= kept
    assert dm.split_sizes()["train"] + dm.split_sizes()["val"] == 3 * 6 + len(sizes)
    assert dm.split_sizes()["test"] == 3 * 6

    for name, size in sizes.items():
        img = load_rgb(str(folder / name))
        assert img.mode == "RGB" and img.size == size, name
    dm.set_preprocessing({"size": 16, "crop_pct": 1.0, "interpolation": "bilinear",
                          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    dm.setup("fit")
    seen = 0
    for x, _ in dm.train_dataloader():  # every kept file decodes through the real transforms
        assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()
        seen += len(x)
    assert seen == dm.split_sizes()["train"]


def test_skip_lists_at_most_n_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    for i in range(LIST_AT_MOST + 3):
        (root / "train" / "fox" / f"zero{i:02d}.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        ImageFolderDataModule(str(root), num_workers=0, on_bad_image="skip").discover()
    (message,) = [r.getMessage() for r in caplog.records if "on_bad_image=skip" in r.getMessage()]
    assert message.count("zero") == LIST_AT_MOST and message.endswith("and 3 more")


def test_skip_that_empties_a_class_and_impossible_combinations_are_user_errors(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=("cat", "dog"), per_class=3)
    for f in (root / "train" / "dog").iterdir():
        f.write_bytes(b"")
    with pytest.raises(UserError, match="train/dog: no readable images left"):
        ImageFolderDataModule(str(root), num_workers=0, on_bad_image="skip").discover()
    with pytest.raises(UserError, match="needs data.check_images=true"):
        ImageFolderDataModule(str(root), num_workers=0, on_bad_image="skip", check_images=False)
    with pytest.raises(UserError, match="data.on_bad_image='ignore'"):
        ImageFolderDataModule(str(root), num_workers=0, on_bad_image="ignore")


def test_error_mentions_how_many_more_are_bad(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    for name in ("a.png", "b.png", "c.png"):
        (root / "train" / "cat" / name).write_bytes(b"")
    expected = r"train/cat/a.png: .*\(and 2 more; data.on_bad_image=skip drops them\)"
    with pytest.raises(UserError, match=expected):
        ImageFolderDataModule(str(root), num_workers=0).discover()
    assert image_problem(str(root / "train" / "cat" / "000.png")) is None
