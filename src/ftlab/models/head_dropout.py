"""``model.head_dropout``: dropout on the features entering the classifier, replacing the backbone's own.

The dropout runs as a forward pre-hook on the head, so parameter names, checkpoints and artifacts are
unchanged (and it does nothing in eval mode). The backbone's own head dropout is switched off so the
two do not stack: timm's ``drop_rate`` (applied just before the classifier) and any ``nn.Dropout``
beside the head in its parent module (torchvision's ``classifier = Sequential(Dropout, Linear)``,
timm's ``head.drop`` / ViT's ``head_drop``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HeadDropout:
    """Forward pre-hook: dropout on the head's input while training. A class, not a lambda, so it pickles."""

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], torch.Tensor):
            return args
        return (nn.functional.dropout(args[0], self.p, module.training), *args[1:])


def set_head_dropout(net: nn.Module, head_name: str, p: float) -> list[str]:
    """Apply dropout ``p`` before ``net.<head_name>``; return the backbone dropouts that were switched off."""
    disabled = []
    if isinstance(getattr(net, "drop_rate", None), float) and net.drop_rate > 0:
        net.drop_rate = 0.0
        disabled.append("drop_rate")
    parent_name, _, _ = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    for name, module in parent.named_children():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            disabled.append(f"{parent_name + '.' if parent_name else ''}{name}")
    net.get_submodule(head_name).register_forward_pre_hook(HeadDropout(p))
    return disabled
