"""DoRA (Liu et al. 2024): a learnable per-output-channel magnitude on top of a LoRA direction update.

y = m / ||W + s·B·A|| · (W x + s·B(A x)) + bias. The norm is treated as a constant (detached), as the paper
recommends to save memory, so ΔW is only ever materialised without autograd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ftlab.adapters.lora import LoRALayer

# Guards the division for an all-zero weight row; such a row has magnitude 0 and stays 0.
_EPS = 1e-12


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm per output channel, over the input (and kernel) dimensions."""
    return weight.flatten(1).norm(dim=1)


def init_magnitude(layer: LoRALayer) -> None:
    """Magnitude = current ||W + s·B·A||, which makes the DoRA layer an identity change at init."""
    weight = layer.weight
    with torch.no_grad():
        norm = channel_norm(weight.float() + layer.delta_weight(torch.float32))
    layer.lora_magnitude_vector = nn.Parameter(norm.to(weight.dtype))


def magnitude_scale(layer: LoRALayer) -> torch.Tensor:
    """m / ||W + s·B·A|| with the norm detached; differentiable w.r.t. the magnitude only."""
    magnitude = layer.lora_magnitude_vector
    with torch.no_grad():
        norm = channel_norm(layer.weight.float() + layer.delta_weight(torch.float32)).clamp_min(_EPS)
    return magnitude / norm.to(magnitude.dtype)


def dora_output(
    layer: LoRALayer, base_out: torch.Tensor, lora_out: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Combine base and LoRA outputs; written as y + (g-1)(y-b) + g·Δ so g == 1 returns y + Δ exactly."""
    shape = [1] * base_out.dim()
    shape[channel_dim] = -1
    g = magnitude_scale(layer).to(base_out.dtype).view(shape)
    bias = layer.bias
    without_bias = base_out if bias is None else base_out - bias.to(base_out.dtype).view(shape)
    return base_out + (g - 1) * without_bias + g * lora_out


def rescale_weight(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = m / ||W|| · W per output channel, the merged DoRA weight for W = W0 + s·B·A."""
    g = magnitude / channel_norm(weight).clamp_min(_EPS)
    return weight * g.view(-1, *([1] * (weight.dim() - 1)))
