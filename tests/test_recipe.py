"""The training recipe: no short last train batch (data.drop_last), mixup/cutmix (data.mixup, data.cutmix),
class-balanced sampling (data.sampler=balanced, also under DDP) and class-weighted loss (model.class_weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from ftlab import train
from ftlab.data import ImageFolderDataModule, feature_cache
from ftlab.data.imbalance import balanced_sample_weights, inverse_frequency, resolve_class_weights
from ftlab.data.mixup import BatchMixup
from ftlab.data.resumable import ResumableSampler
from ftlab.data.text import LengthGroupedSampler, TextDataModule
from ftlab.errors import UserError
from ftlab.module import ClassifierModule
from ftlab.validate import validate
from helpers import FAST_TRAINER, ONE_THREAD_ENV, REPO, TINY_MODEL, labelled, make_imagefolder, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")
PREPROC = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0}


def _images(tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    """30 train images in 3 classes, 4 of them split off for validation: 26 train, and a 30-image test/."""
    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"), size=16)
    dm = ImageFolderDataModule(str(root), num_workers=0, augment="none", check_images=False, seed=3, **kwargs)
    dm.discover()
    dm.set_preprocessing(PREPROC)
    dm.setup("fit")
    return dm


def _imbalanced(root: Path, keep: dict[str, int]) -> Path:
    """A toy image folder with val/ and test/, its train classes cut to ``keep`` images each."""
    make_imagefolder(root, per_class=max(keep.values()), splits=("train", "val", "test"), size=16)
    for cls, n in keep.items():
        for f in sorted((root / "train" / cls).glob("*.png"))[n:]:
            f.unlink()
    return root


# -- data.drop_last ------------------------------------------------------------------------------------
def test_train_loader_drops_the_short_last_batch_and_evaluation_keeps_every_sample(tmp_path: Path) -> None:
    dm = _images(tmp_path, batch_size=4)
    assert dm.split_sizes()["train"] == 26
    train_sizes = [len(y) for _, y in dm.train_dataloader()]
    assert train_sizes == [4] * 6  # 26 = 6 x 4 + 2: the 2 are left for another epoch's shuffle
    assert sum(len(y) for _, y in dm.val_dataloader()) == 4
    assert sum(len(y) for _, y in dm.test_dataloader()) == 30

    dm.drop_last = False
    assert [len(y) for _, y in dm.train_dataloader()] == [4] * 6 + [2]
    dm.drop_last, dm.batch_size = True, 32  # a train split smaller than a batch keeps its one batch
    assert [len(y) for _, y in dm.train_dataloader()] == [26]


def test_drop_last_counts_this_ranks_share_and_resumes_mid_epoch(tmp_path: Path) -> None:
    dm = _images(tmp_path, batch_size=4)
    sampler = dm.train_sampler(dm.datasets["train"], 2, 1)  # 13 of the 26 on each of 2 ranks
    assert len(sampler) == 13 and dm.drops_last(sampler)
    dm.batch_size = 13
    assert not dm.drops_last(sampler)

    dm.batch_size = 4
    full = [y.tolist() for _, y in dm.train_dataloader()]
    dm.load_state_dict({"epoch": 0, "batches_done": 2, "num_batches": 6, "batch_size": 4})
    assert [y.tolist() for _, y in dm.train_dataloader()] == full[2:]


def test_text_batches_grouped_by_length_drop_only_the_short_tail(tmp_path: Path, tiny_bert: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())  # 20 texts
    write_csv(tmp_path / "d" / "val.csv", labelled(2))
    dm = TextDataModule(str(tmp_path / "d"), batch_size=3, seed=1, group_by_length=True)
    dm.discover()
    dm.set_preprocessing({"modality": "text", "tokenizer": str(tiny_bert), "max_length": 16})
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    grouped = loader.sampler.grouped(loader.sampler.epoch_indices())
    batches = [y.tolist() for _, y in loader]
    assert [len(b) for b in batches] == [3] * 6  # 20 = 6 x 3 + 2
    labels = [dm.datasets["train"].samples[i][1] for i in grouped]
    assert sum(batches, []) == labels[:18]  # exactly the sampler's groups, its short tail dropped
    dm.drop_last = False
    assert [len(y) for _, y in dm.train_dataloader()] == [3] * 6 + [2]


# -- data.sampler=balanced -------------------------------------------------------------------------------
def test_balanced_sampler_draws_classes_equally_deals_ranks_their_own_share_and_resumes() -> None:
    labels = [0] * 90 + [1] * 10
    weights = balanced_sample_weights(labels)
    assert sum(w for w, y in zip(weights, labels, strict=True) if y == 0) == pytest.approx(1.0)
    assert sum(w for w, y in zip(weights, labels, strict=True) if y == 1) == pytest.approx(1.0)
    one = ResumableSampler(labels, 1, 0, seed=5, weights=weights)
    ranks = [ResumableSampler(labels, 2, r, seed=5, weights=weights) for r in (0, 1)]
    draws = {}
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        whole = list(one)
        shares = [list(s) for s in ranks]
        assert len(whole) == 100 and [len(s) for s in shares] == [50, 50]  # the epoch stays the train set size
        assert shares[0] != shares[1]  # not the same samples on every rank
        assert shares[0] == whole[0::2] and shares[1] == whole[1::2]  # together: one process's draw
        draws[epoch] = whole
        counts = Counter(labels[i] for i in whole)
        assert 30 <= counts[1] <= 70, counts  # a plain shuffle draws class 1 ten times
    assert draws[0] != draws[1]  # reseeded every epoch
    resumed = ResumableSampler(labels, 2, 1, seed=5, weights=weights)
    resumed.resume(1, 20)
    assert list(resumed) == draws[1][1::2][20:]


def test_balanced_sampler_in_the_image_and_text_data_modules(tmp_path: Path, tiny_bert: Path) -> None:
    root = _imbalanced(tmp_path / "imgs", {"cat": 24, "dog": 3, "fox": 3})
    dm = ImageFolderDataModule(str(root), batch_size=5, num_workers=0, augment="none", seed=0, sampler="balanced")
    dm.discover()
    dm.set_preprocessing(PREPROC)
    dm.setup("fit")
    drawn = Counter()
    for epoch in range(4):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        drawn.update(y for _, ys in loader for y in ys.tolist())
    assert sum(drawn.values()) == 4 * 30 and min(drawn.values()) >= 25, drawn  # plain: 12 of each rare class

    rows = [(t, "pos") for t, _ in labelled()[:10]] + [(t, "neg") for t, _ in labelled()[10:12]]
    write_csv(tmp_path / "t" / "train.csv", rows)
    write_csv(tmp_path / "t" / "val.csv", labelled(2))
    for group in (False, True):
        text = TextDataModule(str(tmp_path / "t"), batch_size=4, seed=0, sampler="balanced", group_by_length=group)
        text.discover()
        text.set_preprocessing({"modality": "text", "tokenizer": str(tiny_bert), "max_length": 16})
        text.setup("fit")
        loader = text.train_dataloader()
        assert loader.sampler.weights is not None
        neg = sum(ys.tolist().count(text.classes.index("neg")) for _, ys in loader)
        assert neg >= 4, neg  # 2 of 12 texts, drawn about half the time


@pytest.mark.slow
def test_balanced_sampler_under_two_process_ddp(tmp_path: Path) -> None:
    """Each rank draws its own share of one seeded class-balanced draw, trains on exactly it (full batches
    only), and a new draw comes every epoch."""
    root = _imbalanced(tmp_path / "imgs", {"cat": 16, "dog": 4, "fox": 4})
    probe = tmp_path / "probe"
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = ["data=imagefolder", f"data.root={root}", "data.batch_size=5", "data.sampler=balanced", *TINY_MODEL,
            "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=2",
            "data.num_workers=0", "method=full", "logger=none", "test=false", "save_artifacts=false", "seed=7",
            "+callbacks.probe._target_=sampler_probe.SamplerProbe", f"+callbacks.probe.out={probe}"]
    proc = subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {(r["rank"], r["epoch"]): r for r in (json.loads(p.read_text()) for p in probe.glob("*.json"))}
    assert sorted(records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    labels = records[0, 0]["dataset_labels"]
    assert len(labels) == 24 and Counter(labels) == Counter({0: 16, 1: 4, 2: 4})
    drawn = Counter()
    for epoch in (0, 1):
        shares = [records[rank, epoch] for rank in (0, 1)]
        assert all(r["sampler"] == "ResumableSampler" and r["world"] == 2 and r["sampler_epoch"] == epoch
                   for r in shares)
        assert shares[0]["indices"] != shares[1]["indices"]
        single = ResumableSampler(labels, 1, 0, seed=7, weights=balanced_sample_weights(labels))
        single.set_epoch(epoch)
        whole = list(single)
        assert shares[0]["indices"] == whole[0::2] and shares[1]["indices"] == whole[1::2]
        for r in shares:
            assert len(r["indices"]) == 12 and r["drop_last"]
            # The batches trained on are the sampler's draw, in order: 2 batches of 5, the short one dropped.
            assert r["batch_labels"] == [labels[i] for i in r["indices"]][:10]
            drawn.update(r["batch_labels"])
    assert records[0, 0]["indices"] != records[0, 1]["indices"]
    assert drawn[1] + drawn[2] > drawn[0], drawn  # a plain shuffle: 32 cats to 16 others


# -- model.class_weights -------------------------------------------------------------------------------
def test_class_weights_auto_is_inverse_frequency_and_explicit_lists_are_checked() -> None:
    assert inverse_frequency([30, 10, 20]) == pytest.approx([60 / 90, 60 / 30, 60 / 60])
    labels = [0] * 30 + [1] * 10 + [2] * 20
    weights = resolve_class_weights("auto", labels, ["a", "b", "c"])
    assert sum(w * n for w, n in zip(weights, [30, 10, 20], strict=True)) == pytest.approx(60)  # mean weight per sample 1
    assert resolve_class_weights([1, 2, 3], labels, ["a", "b", "c"]) == [1.0, 2.0, 3.0]
    assert resolve_class_weights(None, labels, ["a", "b", "c"]) is None
    with pytest.raises(UserError, match=r"model.class_weights=\[1, 2\]: 2 weights for 3 classes"):
        resolve_class_weights([1, 2], labels, ["a", "b", "c"])


@pytest.mark.parametrize(("override", "message"), [
    ("model.class_weights=often", "model.class_weights='often': must be null, auto or a list of numbers >= 0"),
    ("model.class_weights=[1,-1]", "model.class_weights=[1, -1]: must be null, auto"),
    ("data.sampler=weighted", "data.sampler='weighted': must be one of shuffle, balanced"),
    ("data.drop_last=sometimes", "data.drop_last='sometimes': must be true or false"),
    ("data.mixup=-0.5", "data.mixup=-0.5: must be a number >= 0"),
    ("data.cutmix=true", "data.cutmix=True: must be a number >= 0"),
    ("data.mixup_prob=0", "data.mixup_prob=0: must be in (0, 1]"),
])
def test_recipe_keys_are_validated(compose_cfg, override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        validate(compose_cfg([override]))
    assert message in str(err.value)


def test_weighted_loss_trains_and_plain_loss_evaluates(tmp_path: Path) -> None:
    module = ClassifierModule(3, source="timm", name="test_resnet", pretrained=False, label_smoothing=0.1,
                              class_weights=[1.0, 4.0, 0.5])
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    weight = torch.tensor([1.0, 4.0, 0.5])
    expected = nn.functional.cross_entropy(logits, y, weight=weight, label_smoothing=0.1)
    assert torch.allclose(module.training_loss(logits, y), expected)
    assert not torch.allclose(module.training_loss(logits, y), module.criterion(logits, y))
    assert "class_weight" not in module.state_dict()  # the hyper-parameters hold the weights
    with pytest.raises(UserError, match="model.class_weights=\\[1.0, 2.0\\]: 2 weights for 3 classes"):
        ClassifierModule(3, source="timm", name="test_resnet", pretrained=False, class_weights=[1.0, 2.0])


def test_recipe_runs_end_to_end_and_checkpoints_record_the_resolved_class_weights(compose_cfg, tmp_path: Path) -> None:
    root = _imbalanced(tmp_path / "imgs", {"cat": 12, "dog": 4, "fox": 4})
    cfg = compose_cfg(["data=imagefolder", f"data.root={root}", "data.batch_size=4", "data.augment=none",
                       *TINY_MODEL, *FAST_TRAINER, "method=full", "logger=none", "trainer.max_epochs=2",
                       "data.sampler=balanced", "model.class_weights=auto", "data.mixup=0.8", "data.cutmix=1.0"])
    metrics = train.run(cfg)
    assert metrics["global_steps"] == 2 * (20 // 4) and metrics["test/f1"] is not None
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_weights"] == pytest.approx([20 / (3 * 12), 20 / (3 * 4), 20 / (3 * 4)])


# -- data.mixup / data.cutmix --------------------------------------------------------------------------
def test_batch_mixup_mixes_pairs_and_an_odd_batch_keeps_its_last_sample() -> None:
    torch.manual_seed(0)
    mix = BatchMixup(4, mixup=0.8, cutmix=0.0, label_smoothing=0.0)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    original = x.clone()
    mixed, target = mix(x, y)
    assert target.shape == (5, 4) and torch.allclose(target.sum(1), torch.ones(5))
    assert torch.equal(mixed[4], original[4]) and torch.equal(target[4], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    lam = float(target[0, 0])  # sample 0 mixed with its mirror (sample 3): lam of one, 1 - lam of the other
    assert 0 < lam < 1 and target[0, 3] == pytest.approx(1 - lam)
    assert torch.allclose(mixed[0], lam * original[0] + (1 - lam) * original[3], atol=1e-5)
    _, single = mix(torch.randn(1, 3, 8, 8), torch.tensor([2]))
    assert torch.equal(single, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_mixup_training_step_uses_soft_targets_and_the_dominant_label() -> None:
    module = ClassifierModule(4, source="timm", name="test_resnet", pretrained=False)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    soft = torch.tensor([[0.7, 0, 0, 0.3], [0, 0.4, 0.6, 0], [0, 0.6, 0.4, 0], [0.3, 0, 0, 0.7]])
    module.mixup = lambda xb, yb: (xb, soft)
    seen = {}
    module.log = lambda name, value, **kw: seen.setdefault(name, value)
    captured = []
    module.net.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    loss = module.training_step((x, y), 0)
    (logits,) = captured
    assert torch.allclose(loss, nn.functional.cross_entropy(logits, soft), atol=1e-5)
    dominant = torch.tensor([0, 2, 1, 3])
    assert module.train_acc.compute() == pytest.approx(float((logits.argmax(1) == dominant).float().mean()))


def test_mixup_errors_name_the_keys(compose_cfg, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"), size=16)
    with pytest.raises(UserError, match="data.batch_size=5: data.mixup=0.8 mix the samples of a batch in pairs"):
        ImageFolderDataModule(str(root), batch_size=5, mixup=0.8)
    write_csv(tmp_path / "t" / "train.csv", labelled())
    with pytest.raises(UserError, match="data.cutmix=1.0: mixup and cutmix mix images; this is text data"):
        TextDataModule(str(tmp_path / "t"), cutmix=1.0)
    with pytest.raises(UserError, match=r"data.mixup=0.8: must be 0 \(mixup and cutmix mix images"):
        validate(compose_cfg(["data=textfile", f"data.root={tmp_path / 't'}", "data.mixup=0.8"]))

    base = ["data=imagefolder", f"data.root={root}", "data.augment=none", "method=linear", *TINY_MODEL,
            *FAST_TRAINER, "logger=none", "data.mixup=0.8"]
    dm, model, trainer = train.build(compose_cfg(base))
    assert model.mixup is not None and dm.feature_cache is None  # auto: no feature cache with mixup
    with pytest.raises(UserError) as err:
        train.build(compose_cfg([*base, "data.cache_features=true"]))
    assert str(err.value).startswith("data.cache_features=true: data.mixup=0.8 mix the images of every batch")
    assert feature_cache.why_not(dm, model) is not None
    dm.mixup = 0.0
    assert feature_cache.why_not(dm, model) is None  # the same run without mixup caches


def test_bench_imbalance_cut_keeps_a_tenth_of_the_rare_classes(tmp_path: Path, digits_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from imbalance import RARE, write_imbalanced

    counts = write_imbalanced(tmp_path / "cut", digits_dir)
    full = {c: len(list((digits_dir / "train" / c).glob("*.png"))) for c in counts}
    for c, n in counts.items():
        assert n == (max(1, round(0.1 * full[c])) if c in RARE else full[c])
    for split in ("val", "test"):
        assert sorted(p.name for p in (tmp_path / "cut" / split).rglob("*.png")) == \
            sorted(p.name for p in (digits_dir / split).rglob("*.png"))
