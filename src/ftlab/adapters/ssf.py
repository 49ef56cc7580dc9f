"""SSF (Lian et al. 2022) / (IA)³-style per-channel scale and shift: θ' = ω·θ + δ after a layer.

After a Linear/Conv2d (any ``groups``) the affine is applied to the layer output. For normalisation layers
the scale/shift is folded into the affine parameters the layer itself uses (γ' = ω·γ, β' = ω·β + δ), so it
acts after the affine but *before* any activation built into the norm (timm ``BatchNormAct2d``,
``GroupNormAct``, ``LayerNormAct``) and works for any subclass that reads ``self.weight``/``self.bias``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ftlab.adapters.common import (
    AdapterLayer,
    find_targets,
    new_param,
    reference_tensor,
    restore_base,
    swap_in,
)

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
SSF_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d, *NORM_TYPES)


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return module.normalized_shape[-1]


class _SSFBase(AdapterLayer):
    display_name = "SSF"
    method = "ssf"
    extra_attributes = ("ssf_scale", "ssf_shift")

    ssf_scale: nn.Parameter
    ssf_shift: nn.Parameter

    def adapter_params(self) -> list[str]:
        return ["ssf_scale", "ssf_shift"]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ssf"

    def _fold(self, weight_name: str, bias_name: str, weight_scale_shape: tuple[int, ...]) -> None:
        """γ ← ω·γ, β ← ω·β + δ on the raw parameters; missing ones are created (the key set grows)."""
        scale, shift = self.ssf_scale, self.ssf_shift
        weight, bias = self._parameters.get(weight_name), self._parameters.get(bias_name)
        like = weight if weight is not None else scale
        with torch.no_grad():
            if weight is None:
                self._parameters[weight_name] = new_param(scale.detach().clone(), like)
            else:
                weight.copy_((weight.float() * scale.float().view(weight_scale_shape)).to(weight.dtype))
            if bias is None:
                created = new_param(shift.detach().clone(), like)
                if weight is not None:
                    created.requires_grad_(weight.requires_grad)
                self._parameters[bias_name] = created
            else:
                bias.copy_((bias.float() * scale.float() + shift.float()).to(bias.dtype))


class SSFLayer(_SSFBase):
    """SSF after a Linear/Conv2d: ``y · ω + δ`` on the output channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        shape = [1] * out.dim()
        shape[1 if isinstance(self, nn.Conv2d) else -1] = -1
        return out * self.ssf_scale.to(out.dtype).view(shape) + self.ssf_shift.to(out.dtype).view(shape)

    def merge_into_base(self) -> None:
        weight = self._parameters["weight"]
        self._fold("weight", "bias", (-1,) + (1,) * (weight.dim() - 1))
        restore_base(self)


class SSFNorm(_SSFBase):
    """SSF on a norm layer: the layer's own forward reads the effective affine parameters.

    ``weight``/``bias`` are properties here, so ``module.weight`` returns ω·γ (a non-leaf tensor) while
    ``state_dict``/``parameters()`` still see the raw γ, β under their usual names.
    """

    @property
    def weight(self) -> torch.Tensor:
        gamma = self._parameters["weight"]
        return self.ssf_scale if gamma is None else gamma * self.ssf_scale

    @property
    def bias(self) -> torch.Tensor:
        beta = self._parameters["bias"]
        return self.ssf_shift if beta is None else beta * self.ssf_scale + self.ssf_shift

    def merge_into_base(self) -> None:
        self._fold("weight", "bias", (-1,))
        restore_base(self)


def add_ssf(module: nn.Module, fallback: torch.Tensor | None = None) -> None:
    """``fallback`` sets dtype/device when the layer owns no tensor (e.g. a LayerNorm without affine)."""
    channels = _channels(module)
    like = reference_tensor(module)
    like = like if like is not None else fallback
    mixin = SSFNorm if isinstance(module, NORM_TYPES) else SSFLayer
    swap_in(module, mixin)
    module.ssf_scale = new_param(torch.ones(channels), like)
    module.ssf_shift = new_param(torch.zeros(channels), like)


def check_ssf_targets(matched: list[tuple[str, nn.Module]]) -> None:
    bad = [n for n, m in matched if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1]
    if bad:
        raise ValueError(f"SSF needs LayerNorms over a single (channel) dimension: {bad}")


def apply_ssf(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Add per-channel scale (init 1) and shift (init 0) to every matched Linear/Conv2d/BatchNorm/
    LayerNorm/GroupNorm (subclasses included). Returns the sorted adapted module names."""
    matched = find_targets(model, targets, SSF_TYPES, "apply_ssf")
    check_ssf_targets(matched)
    fallback = next(iter(model.parameters()), None)
    for _, module in matched:
        add_ssf(module, fallback)
    return sorted(name for name, _ in matched)
