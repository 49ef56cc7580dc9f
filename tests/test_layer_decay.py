"""model.layer_decay: per-block learning rates by timm's grouping, composed with ftlab's param groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from hydra.utils import instantiate

from ftlab.errors import UserError
from ftlab.module import ClassifierModule
from ftlab.train import run
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
# test_resnet's timm grouping (group_matcher(coarse=False)): stem, layer1..layer4, then the head.
DEPTH = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4, "fc": 5}


def _lr_of(module: ClassifierModule) -> dict[str, dict[str, Any]]:
    """Parameter name -> its group's lr, weight decay and name."""
    ids = {id(p): n for n, p in module.named_parameters()}
    return {ids[id(p)]: {"lr": g["lr"], "wd": g["weight_decay"], "group": g["name"]}
            for g in module.param_groups() for p in g["params"]}


def test_lrs_decay_geometrically_by_depth() -> None:
    module = ClassifierModule(num_classes=3, source="timm", name="test_resnet", pretrained=False,
                              lr=0.1, backbone_lr_mult=0.5, weight_decay=0.01, layer_decay=0.5)
    groups = _lr_of(module)
    assert set(groups) == {n for n, p in module.named_parameters()}
    for name, g in groups.items():
        depth = DEPTH[name.split(".")[1]]
        if depth == 5:  # the head: the full lr, no backbone multiplier, no layer factor
            assert g["lr"] == pytest.approx(0.1), name
        else:  # pretrained: lr * backbone_lr_mult * 0.5 ** (layers between it and the head)
            assert g["lr"] == pytest.approx(0.1 * 0.5 * 0.5 ** (5 - depth)), name
        assert g["group"].endswith(f"_layer{depth}")
        # Weight-decay exclusions still hold inside every layer.
        assert g["wd"] == (0.0 if module.get_parameter(name).ndim <= 1 else 0.01), name
    lrs = sorted({g["lr"] for n, g in groups.items() if not n.startswith("net.fc.")})
    assert [b / a for a, b in zip(lrs, lrs[1:], strict=False)] == pytest.approx([2.0] * 4)


def test_off_by_default_and_at_one() -> None:
    for decay in (None, 1.0):
        module = ClassifierModule(num_classes=3, source="timm", name="test_resnet", pretrained=False,
                                  layer_decay=decay)
        assert {g["name"] for g in module.param_groups()} == {"new", "new_no_decay", "pretrained",
                                                             "pretrained_no_decay"}


def test_only_trainable_parameters_under_lora(compose_cfg) -> None:
    cfg = compose_cfg(["method=lora", *TINY_MODEL, "model.layer_decay=0.5", "model.targets=[layer3.*conv\\d,layer4.*conv\\d]"])
    module = instantiate(cfg.model, num_classes=3, _convert_="all")
    groups = _lr_of(module)
    assert set(groups) == {n for n, p in module.named_parameters() if p.requires_grad}
    lr = cfg.model.lr
    for name, g in groups.items():
        if name.startswith("net.fc."):
            assert g["lr"] == pytest.approx(lr)
        else:  # adapters train at lr, scaled by the depth of the layer they adapt
            assert "lora_" in name
            assert g["lr"] == pytest.approx(lr * 0.5 ** (5 - DEPTH[name.split(".")[1]])), name


def test_text_encoder_layers(tiny_bert: Path) -> None:
    module = ClassifierModule(num_classes=2, source="hf", name=str(tiny_bert), lr=1.0, layer_decay=0.5)
    groups = _lr_of(module)
    embeddings = {g["lr"] for n, g in groups.items() if ".embeddings." in n}
    layer = [{g["lr"] for n, g in groups.items() if f".layer.{i}." in n} for i in range(2)]
    head = {g["lr"] for n, g in groups.items() if n.startswith(f"net.{module.head_name}.")}
    assert embeddings == {0.125} and layer == [{0.25}, {0.5}] and head == {1.0}


def test_a_network_without_block_grouping_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"^model.layer_decay=0.75: resnet18 has no block grouping"):
        ClassifierModule(num_classes=3, source="torchvision", name="resnet18", weights=None, layer_decay=0.75)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.5", "true"])
def test_bad_values_are_one_line_errors(compose_cfg, value: str) -> None:
    with pytest.raises(UserError, match=r"^model.layer_decay=.*: must be null or in \(0, 1\]"):
        validate(compose_cfg([f"model.layer_decay={value}"]))


class OptimizerLrs(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = {g["name"]: g["initial_lr"] for g in trainer.optimizers[0].param_groups}


def test_a_run_trains_with_the_decayed_groups(compose_cfg, imagefolder: Path) -> None:
    seen = OptimizerLrs()
    cfg = compose_cfg(["method=full", "data=imagefolder", f"data.root={imagefolder}", "data.batch_size=8",
                       *TINY_MODEL, *FAST_TRAINER, "logger=none", "trainer.fast_dev_run=true",
                       "model.lr=0.01", "model.layer_decay=0.75"])
    run(cfg, extra_callbacks=[seen])
    assert seen.initial["new_layer5"] == pytest.approx(0.01)
    assert seen.initial["pretrained_layer0"] == pytest.approx(0.01 * 0.75 ** 5)
    assert seen.initial["pretrained_no_decay_layer3"] == pytest.approx(0.01 * 0.75 ** 2)
