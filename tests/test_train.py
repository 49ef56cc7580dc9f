"""End to end through the real configs: fit + test, metrics.json, TensorBoard, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftlab.module import ClassifierModule, classification_metrics, warmup_cosine
from ftlab.train import run
from helpers import FAST_TRAINER, TINY_MODEL

METRIC_KEYS = {"method", "model", "data", "num_classes", "params_total", "params_trainable", "val/acc_best",
               "test/acc", "test/f1", "fit_seconds", "peak_rss_mb", "epochs"}


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["method=full", "data=imagefolder", f"data.root={root}", "data.batch_size=8", *TINY_MODEL, *FAST_TRAINER, *extra]


def test_fast_dev_run_fit_and_test(compose_cfg, imagefolder: Path) -> None:
    cfg = compose_cfg(_overrides(imagefolder, "trainer.fast_dev_run=true", "logger=none"))
    metrics = run(cfg)
    assert metrics["num_classes"] == 3
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_one_epoch_writes_metrics_checkpoints_and_tensorboard(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(_overrides(imagefolder, "trainer.max_epochs=2", "model.lr=0.01", "trainer.log_every_n_steps=1"))
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved)
    assert saved == json.loads(json.dumps(metrics))
    assert saved["method"] == "full" and saved["model"] == "test_resnet"
    assert saved["params_trainable"] == saved["params_total"] > 0
    assert saved["epochs"] == 2
    assert saved["split_sizes"] == {"train": 26, "val": 4, "test": 30}
    # Three colours are easy: the tiny random-init net must learn them.
    assert saved["val/acc_best"] >= 0.6
    assert 0 < saved["test/f1"] <= 1.0
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    # Where the run's time went (ftlab.timing): every phase, the fit as timed for fit_seconds.
    phases = saved["phase_seconds"]
    assert set(phases) == {"imports", "startup", "checks", "data", "model", "trainer", "fit", "test", "artifacts"}
    assert all(v >= 0 for k, v in phases.items() if k not in ("imports", "startup"))
    assert phases["fit"] == pytest.approx(saved["fit_seconds"], abs=0.05)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for event_file in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss_step", "val/acc", "val/f1", "test/acc"} <= tags
    assert any(t.startswith("lr-") for t in tags), tags


def test_resume_from_last_checkpoint_continues_the_run(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "resumable"
    first = run(compose_cfg(_overrides(imagefolder, "trainer.max_epochs=1", "logger=csv"), run_dir=run_dir))
    assert first["epochs"] == 1
    steps_per_epoch = first["global_steps"]
    resumed = run(compose_cfg(_overrides(imagefolder, "trainer.max_epochs=2", "logger=csv", "ckpt_path=last"),
                              run_dir=run_dir))
    assert resumed["epochs"] == 2
    assert resumed["global_steps"] == 2 * steps_per_epoch


def test_missing_resume_checkpoint_is_auser_message(compose_cfg, imagefolder: Path) -> None:
    from ftlab.errors import UserError

    with pytest.raises(UserError, match="last.ckpt does not exist"):
        run(compose_cfg(_overrides(imagefolder, "ckpt_path=last")))


def test_param_groups_split_head_backbone_and_no_decay() -> None:
    module = ClassifierModule(num_classes=3, source="timm", name="test_resnet", pretrained=False,
                              lr=0.1, backbone_lr_mult=0.5, weight_decay=0.01)
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["new"]["lr"] == 0.1 and groups["pretrained"]["lr"] == 0.05
    assert groups["pretrained_no_decay"]["weight_decay"] == 0.0 and groups["new"]["weight_decay"] == 0.01
    assert all(p.ndim <= 1 for p in groups["pretrained_no_decay"]["params"])
    head = {id(p) for p in module.net.fc.parameters()}
    assert {id(p) for g in ("new", "new_no_decay") for p in groups[g]["params"]} == head
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == module.parameter_counts()["params_trainable"]


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(100, 0.1)
    assert f(0) < 0.2 and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01


def test_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    torch.manual_seed(0)
    y = torch.randint(0, 10, (300,))
    logits = torch.randn(300, 10) + 3 * torch.nn.functional.one_hot(y, 10)
    metrics = classification_metrics(10, "test/")
    for i in range(0, 300, 32):
        metrics.update(logits[i:i + 32], y[i:i + 32])
    out = metrics.compute()
    pred = logits.argmax(1)
    assert out["test/acc"].item() == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert out["test/f1"].item() == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-5)
    top5 = (logits.topk(5).indices == y[:, None]).any(1).float().mean().item()
    assert out["test/acc_top5"].item() == pytest.approx(top5, abs=1e-6)
