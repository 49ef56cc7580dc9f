"""Fold every adapter back into plain layers, e.g. before export or plain-timm inference."""

from __future__ import annotations

import torch.nn as nn

from ftlab.adapters.common import adapter_layers


def merge_adapters(model: nn.Module) -> list[str]:
    """Merge all LoRA/DoRA/PiSSA/qkv/SSF layers in place and return their sorted names.

    Afterwards each module is an instance of its original class again (``type(m) is Conv2dSame``) with no
    extra parameters, so ``state_dict()`` has the plain model's keys. The one exception: SSF on a layer
    without bias (or on a norm without affine parameters) creates the missing ``bias``/``weight``, because
    the shift has nowhere else to go. Base parameters are updated in place (same Parameter objects).
    Merging a model without adapters is a no-op returning [].
    """
    merged = []
    for name, layer in adapter_layers(model):
        layer.merge_into_base()
        merged.append(name)
    return sorted(merged)
