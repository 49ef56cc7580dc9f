"""data.cache_features: on exactly when valid, the backbone runs once per image, and training is unchanged."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ftlab import train
from ftlab.data import feature_cache
from ftlab.data.feature_cache import HeadOnFeatures, random_layers
from ftlab.errors import UserError
from ftlab.evaluate import evaluate
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL, make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Images, and base weights the artifacts can rebuild the backbone from (TINY_MODEL is unpretrained)."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("feature_cache")
    images = make_imagefolder(root / "images", per_class=14, splits=("train", "test"))
    torch.manual_seed(0)
    base = root / "base.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(base))
    return images, base


def _overrides(data: tuple[Path, Path], *extra: str) -> list[str]:
    images, base = data
    return ["data=imagefolder", f"data.root={images}", "data.augment=none", "data.batch_size=8", "method=linear",
            *TINY_MODEL, f"model.checkpoint={base}", *FAST_TRAINER, "trainer.max_epochs=2", "logger=none",
            "callbacks.step_checkpoint.every_n_steps=1", *extra]


def _run(compose_cfg, data: tuple[Path, Path], run_dir: Path, *extra: str, callbacks: tuple = ()) -> dict:
    cfg = compose_cfg(_overrides(data, *extra), run_dir=run_dir)
    metrics = train.run(cfg, callbacks)
    # As Hydra's main would, so `ftlab eval RUN` finds the run's data.
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run_dir / ".hydra" / "config.yaml")
    return metrics


def _head(run_dir: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.fc.")}


def test_auto_runs_the_backbone_once_per_image(compose_cfg, data, tmp_path: Path, monkeypatch, caplog) -> None:
    images_seen = []
    attach = feature_cache.attach

    def counting_attach(datamodule, model, trainer):
        model.net.register_forward_pre_hook(lambda m, args: images_seen.append(len(args[0])))
        return attach(datamodule, model, trainer)

    monkeypatch.setattr(feature_cache, "attach", counting_attach)
    with caplog.at_level(logging.INFO, logger="ftlab"):
        metrics = _run(compose_cfg, data, tmp_path / "run", "trainer.max_epochs=3")
    assert "data.cache_features: on" in caplog.text
    sizes = metrics["split_sizes"]
    # Once per train and val image (cached), once per test image (test runs on images), whatever the epochs.
    assert sum(images_seen) == sizes["train"] + sizes["val"] + sizes["test"]
    # Full batches only (data.drop_last), as without the cache.
    assert metrics["epochs"] == 3 and metrics["global_steps"] == 3 * (sizes["train"] // 8)


@pytest.mark.parametrize("extra", [["method=lora"], ["method=bitfit"], ["method=gradual"], ["data.augment=basic"],
                                   ["model.freeze_norm_stats=false"], ["data.cache_features=false"]])
def test_auto_stays_off_when_invalid(compose_cfg, data, extra: list[str], caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="ftlab"):
        datamodule, _, trainer = train.build(compose_cfg(_overrides(data, *extra)))
    assert datamodule.feature_cache is None
    assert not any(isinstance(c, feature_cache.FeatureCache) for c in trainer.callbacks)
    if extra != ["data.cache_features=false"]:
        assert "data.cache_features=auto: off, " in caplog.text


@pytest.mark.parametrize(("extra", "message"), [
    (["data.augment=basic"], "data.cache_features=true: data.augment=basic changes the images every epoch; "
                             "use data.augment=none or data.cache_features=auto"),
    (["method=full"], "data.cache_features=true: method full trains backbone parameters (conv1.0.weight, "
                       "conv1.1.weight, conv1.1.bias, … 45 in all), so the features change every step; "
                       "use method=linear or data.cache_features=auto"),
    (["model.freeze_norm_stats=false"], "data.cache_features=true: model.freeze_norm_stats=false lets"),
])
def test_true_when_invalid_is_auser_message(compose_cfg, data, extra: list[str], message: str) -> None:
    with pytest.raises(UserError) as info:
        train.build(compose_cfg(_overrides(data, "data.cache_features=true", *extra)))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_setting_is_validated(compose_cfg, data) -> None:
    with pytest.raises(UserError, match=r"^data.cache_features='maybe': must be auto, true or false$"):
        validate(compose_cfg(_overrides(data, "data.cache_features=maybe")))


def test_true_when_invalid_exits_1_from_the_cli(cli, data) -> None:
    proc = cli(*_overrides(data, "data.cache_features=true", "method=bitfit"), timeout=120)
    assert proc.returncode == 1
    assert "ftlab: error: data.cache_features=true: method bitfit trains backbone parameters (" in proc.stderr


def test_cached_run_trains_and_evaluates_like_an_uncached_one(compose_cfg, data, tmp_path: Path) -> None:
    # head_dropout: the dropout still applies on cached features, with the very same masks.
    runs = {mode: tmp_path / mode for mode in ("true", "false")}
    metrics = {mode: _run(compose_cfg, data, d, f"data.cache_features={mode}", "model.head_dropout=0.5",
                          "model.lr=0.05") for mode, d in runs.items()}
    cached, plain = metrics["true"], metrics["false"]
    for key in ("global_steps", "epochs", "val/acc", "val/acc_best", "test/acc", "test/f1", "params_trainable"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-6), key
    for name in ("last.ckpt", "best.ckpt"):
        heads = [_head(d, name) for d in runs.values()]
        assert heads[0].keys() == heads[1].keys() and heads[0]
        for key in heads[0]:
            torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)
    # The artifact is the usual one (`ftlab eval RUN` rebuilds the base and loads the head).
    evals = {mode: evaluate(str(d), num_workers=0) for mode, d in runs.items()}
    assert evals["true"]["accuracy"] == pytest.approx(cached["test/acc"])
    assert evals["true"]["accuracy"] == evals["false"]["accuracy"]
    assert evals["true"]["loss"] == pytest.approx(evals["false"]["loss"], abs=1e-4)


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 7:  # mid-epoch 2 (4 full batches an epoch), after last.ckpt was refreshed
            raise RuntimeError("crash")


def test_cached_run_resumes_mid_epoch(compose_cfg, data, tmp_path: Path) -> None:
    whole = _run(compose_cfg, data, tmp_path / "whole", "trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="crash"):
        _run(compose_cfg, data, tmp_path / "cut", "trainer.max_epochs=3", callbacks=(_Crash(),))
    resumed = _run(compose_cfg, data, tmp_path / "cut", "trainer.max_epochs=3", "ckpt_path=last")
    assert resumed["global_steps"] == whole["global_steps"] == 12
    for key, value in _head(tmp_path / "whole").items():
        torch.testing.assert_close(_head(tmp_path / "cut")[key], value, rtol=1e-5, atol=1e-6)


def _logits(net: nn.Module, head_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same seed: ``net`` training on images, the head on cached (eval-mode) features, the head alone."""
    captured = []
    net.get_submodule(head_name).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    net.eval()
    net(x)
    features = captured[-1]
    for m in net.modules():  # training, with norm statistics frozen as model.freeze_norm_stats holds them
        m.train(not isinstance(m, nn.modules.batchnorm._BatchNorm))
    torch.manual_seed(3)
    images = net(x)
    torch.manual_seed(3)
    cached = HeadOnFeatures(net, head_name)(features)
    return {"images": images, "cached": cached, "no dropout": net.get_submodule(head_name)(features)}


def test_the_backbones_own_pre_head_dropout_still_applies() -> None:
    import timm

    timm_net = timm.create_model("test_resnet", num_classes=3, drop_rate=0.5)  # F.dropout before `fc`
    torchvision_like = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16)),
        classifier=nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 3)),
    ))
    for net, head in ((timm_net, "fc"), (torchvision_like, "classifier.1")):
        logits = _logits(net, head, torch.randn(6, 3, 8, 8))
        torch.testing.assert_close(logits["cached"], logits["images"])
        assert not torch.allclose(logits["cached"], logits["no dropout"])


def test_random_layers_inside_the_backbone_are_named() -> None:
    net = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.1)),
        classifier=nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 3)),
    ))
    assert random_layers(net, "classifier.1") == ["features.2 (Dropout, p=0.1)"]
