"""data.cache: decoded once in setup, identical samples, never re-read, refused when memory is short."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftlab.data import ImageFolderDataModule, image_cache
from ftlab.data.image_cache import CachedImageListDataset, DecodedImages
from ftlab.errors import UserError
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL, make_imagefolder

PREPROC = {"size": 16, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic",
           "crop_pct": 0.875}


def _messy_folder(root: Path) -> Path:
    """Square PNGs plus the cases the cache must store as load_rgb returns them: other sizes and aspect
    ratios, palette and RGBA images, an EXIF-rotated JPEG."""
    make_imagefolder(root, per_class=6, splits=("train", "test"))
    rng = np.random.default_rng(1)
    folder = root / "train" / "cat"
    Image.fromarray(rng.integers(0, 255, (31, 47, 3), np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (40, 12, 3), np.uint8)).convert("P").save(folder / "palette.png")
    rgba = Image.fromarray(rng.integers(0, 255, (25, 25, 4), np.uint8), "RGBA")
    rgba.save(root / "train" / "dog" / "alpha.png")
    img = Image.fromarray(rng.integers(0, 255, (18, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(root / "test" / "fox" / "rotated.jpg", exif=exif)
    return root


def _module(root: Path, cache: bool, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), batch_size=4, num_workers=0, val_fraction=0.3, cache=cache,
                               **kwargs)
    dm.set_preprocessing(PREPROC)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("augment", ["none", "basic"])
def test_cached_samples_equal_uncached(tmp_path: Path, augment: str) -> None:
    root = _messy_folder(tmp_path / "d")
    plain, cached = _module(root, False, augment=augment), _module(root, True, augment=augment)
    assert isinstance(cached.datasets["train"], CachedImageListDataset)
    for split in ("train", "val", "test"):
        a, b = plain.datasets[split], cached.datasets[split]
        assert a.samples == b.samples
        for i in range(len(a)):
            # The same random draws for both: augmentation then gives the same crop and flip.
            torch.manual_seed(i)
            x, y = a[i]
            torch.manual_seed(i)
            xc, yc = b[i]
            assert y == yc and type(y) is type(yc)
            assert xc.dtype == torch.float32 and xc.shape == (3, 16, 16)
            assert torch.equal(x, xc), (split, a.samples[i][0])
    store = cached.datasets["train"].images
    # augment=none stores the eval resize + crop (16 x 16); otherwise native resolution.
    native = sum(w * h * 3 for w, h in (Image.open(p).size for p in store.paths))
    assert store.nbytes == (len(store) * 16 * 16 * 3 if augment == "none" else native)


def test_cache_holds_each_file_once_and_test_on_val_shares_it(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=6)
    dm = _module(root, True)
    assert dm.test_on_val
    store = dm.datasets["train"].images
    assert dm.datasets["val"].images is store and dm.datasets["test"].images is store
    assert len(store) == 18 == len(dm.datasets["train"]) + len(dm.datasets["val"])
    dm.setup("test")  # Lightning calls setup again for the test stage: nothing is decoded twice
    assert dm.datasets["test"].images is store


@pytest.mark.parametrize("num_workers", [0, 1])
def test_files_are_not_read_again_after_setup(tmp_path: Path, num_workers: int) -> None:
    """Removing the whole tree after setup changes nothing, in the main process and in persistent
    workers (forked after setup, across two epochs)."""
    root = make_imagefolder(tmp_path / "d", per_class=6, splits=("train", "val"))
    # drop_last=False: every one of the 18 train images is served (by default the short last batch is dropped).
    dm = ImageFolderDataModule(str(root), batch_size=4, num_workers=num_workers, augment="basic", cache=True,
                               drop_last=False)
    dm.set_preprocessing(PREPROC)
    dm.setup("fit")
    expected = [dm.datasets["val"][i][0] for i in range(len(dm.datasets["val"]))]
    shutil.rmtree(root)
    train = dm.train_dataloader()
    for epoch in range(2):
        train.sampler.set_epoch(epoch)
        assert sum(len(y) for _, y in train) == 18
    got = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(got, torch.stack(expected))


def test_decoding_happens_once_in_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4, splits=("train", "val"))
    calls: list[str] = []
    real = image_cache.load_rgb
    monkeypatch.setattr(image_cache, "load_rgb", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr("ftlab.data.images.load_rgb", lambda p: pytest.fail(f"{p} read by the dataset"))
    dm = _module(root, True, augment="basic")
    assert sorted(calls) == sorted({p for s in ("train", "val") for p, _ in dm._splits[s]})
    for _ in range(2):
        for batch in dm.train_dataloader():
            assert batch[0].shape[1:] == (3, 16, 16)
    assert len(calls) == 24


def test_refused_when_memory_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4, size=20)
    monkeypatch.setattr(image_cache, "available_memory", lambda: 10_000)
    with pytest.raises(UserError) as err:
        _module(root, True, augment="basic")
    message = str(err.value)
    assert message.startswith("data.cache=true: the 12 decoded images would take about 0.0 MiB")
    assert "0.0 MiB of available memory; set data.cache=false" in message and "\n" not in message
    # Native size comes from the headers: 12 images of 20 x 20 x 3 bytes, against half of 10,000.
    monkeypatch.setattr(image_cache, "available_memory", lambda: 2 * 12 * 20 * 20 * 3)
    _module(root, True, augment="basic")


def test_available_memory_is_a_plausible_number() -> None:
    avail = image_cache.available_memory()
    assert avail is None or 0 < avail < 2**50


def test_skipped_bad_files_are_not_cached(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=5, splits=("train", "val"))
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    dm = _module(root, True, on_bad_image="skip")
    store = dm.datasets["train"].images
    assert str(bad) not in store.paths and len(store) == 30


def test_unreadable_file_without_the_check_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=4)
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken\.png: unreadable image .*data\.cache"):
        _module(root, True, augment="none", check_images=False)


def test_cross_validation_folds_share_one_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=6, splits=("train", "test"))
    calls: list[str] = []
    real = image_cache.load_rgb
    monkeypatch.setattr(image_cache, "load_rgb", lambda p: calls.append(p) or real(p))
    folds = [_module(root, True, folds=3, fold=k) for k in range(3)]
    stores = {id(dm.datasets["train"].images) for dm in folds}
    assert len(stores) == 1 and len(calls) == 36
    assert folds[0]._splits["val"] != folds[1]._splits["val"]
    plain = _module(root, False, folds=3, fold=1)
    for i in range(len(plain.datasets["val"])):
        assert torch.equal(plain.datasets["val"][i][0], folds[1].datasets["val"][i][0])


def test_store_round_trips_pixels(tmp_path: Path) -> None:
    arrays = [np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) for h, w in ((3, 5), (7, 2), (1, 1))]
    paths = []
    for i, arr in enumerate(arrays):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    store = DecodedImages(paths, [a.nbytes for a in arrays])
    for slot, arr in zip(store.slots(paths), arrays, strict=True):
        img = store.image(int(slot))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_cache_key_is_validated(compose_cfg) -> None:
    with pytest.raises(UserError, match="data.cache='yes': must be true or false"):
        validate(compose_cfg(["data=imagefolder", "data.root=/x", "data.cache=yes"]))
    assert compose_cfg(["data=digits"]).data.cache is False


def test_training_with_cache_end_to_end(compose_cfg, imagefolder: Path, one_thread: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from ftlab.train import run

    built: list[int] = []
    real = image_cache.image_store
    monkeypatch.setattr(image_cache, "image_store", lambda *a, **k: built.append(1) or real(*a, **k))
    cfg = compose_cfg(["method=full", "data=imagefolder", f"data.root={imagefolder}", "data.batch_size=8",
                       *TINY_MODEL, *FAST_TRAINER, "data.cache=true", "logger=none",
                       "trainer.fast_dev_run=true"])
    metrics = run(cfg)
    assert metrics["num_classes"] == 3 and 0.0 <= metrics["test/acc"] <= 1.0
    assert built  # the run went through the cache
