"""Which pretrained parameters form a "block": timm's own grouping, else top-level children."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from ftlab.errors import UserError

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def backbone_groups(net: nn.Module, head: str) -> list[list[str]]:
    """Parameter names per block/stage from input to output, the head excluded."""
    matcher = getattr(net, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        groups = [list(v) for v in group_parameters(net, matcher(coarse=True)).values()]
    else:
        groups = [[f"{child}.{n}" for n, _ in module.named_parameters()] for child, module in net.named_children()]
    groups = [[n for n in g if not _is_head(n, head)] for g in groups]
    return [g for g in groups if g]


def parameters_matching(net: nn.Module, patterns: str | Sequence[str], key: str) -> list[str]:
    """Parameter names that full-match any regex; no match is an error listing examples."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = [re.compile(p) for p in patterns]
    names = [n for n, _ in net.named_parameters() if any(c.fullmatch(n) for c in compiled)]
    if not names:
        examples = [n for n, _ in net.named_parameters()][:: max(1, len(list(net.parameters())) // 6)][:6]
        raise UserError(f"{key}={patterns}: matches no parameter; names look like {', '.join(examples)}")
    return names


def set_trainable(net: nn.Module, names: Iterable[str]) -> None:
    """Exactly these parameters train; everything else is frozen."""
    names = set(names)
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)


def head_names(net: nn.Module, head: str) -> list[str]:
    return [n for n, _ in net.named_parameters() if _is_head(n, head)]


def auto_lora_targets(net: nn.Module, head: str) -> list[str]:
    """The network's own choice when it has one (a text encoder: its query/value projections), else every
    Linear and ungrouped Conv2d except the head (qkv/proj/mlp in ViTs, all convs in CNNs)."""
    own = getattr(net, "lora_targets", None)
    if callable(own):
        return list(own())
    out = []
    for name, m in net.named_modules():
        if _is_head(name, head) or not name:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(re.escape(name))
    return out


def auto_ssf_targets(net: nn.Module, head: str) -> list[str]:
    """Normalisation layers, plus Linear layers where no norm follows (ViT blocks)."""
    out = []
    for name, m in net.named_modules():
        if _is_head(name, head) or not name:
            continue
        if isinstance(m, _NORMS) or isinstance(m, nn.Linear):
            out.append(re.escape(name))
    return out
