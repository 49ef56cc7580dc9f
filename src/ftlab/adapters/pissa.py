"""PiSSA initialisation (Meng et al. 2024): start LoRA on the principal singular directions of W.

W = U·S·Vᵀ; with scale s we set B = U_r·sqrt(S_r/s), A = sqrt(S_r/s)·V_rᵀ so that s·B·A is the top-r part,
and the frozen base weight becomes the residual W − s·B·A. The residual no longer equals the pretrained
weight, which is why a saved PiSSA adapter also stores the base ``weight`` of every PiSSA layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ftlab.adapters.lora import LoRALayer


def pissa_init_(layer: LoRALayer) -> None:
    """Initialise A/B from the SVD of each adapted weight block and replace it by the residual in place."""
    weight = layer.weight
    s = layer.scaling
    with torch.no_grad():
        for rows, lora_a, lora_b in layer.lora_pairs():
            block = weight[rows].flatten(1).float()
            u, sv, vh = torch.linalg.svd(block, full_matrices=False)
            r = lora_a.weight.shape[0]
            root = (sv[:r] / s).sqrt()
            lora_b.weight.copy_((u[:, :r] * root).view_as(lora_b.weight))
            lora_a.weight.copy_((root[:, None] * vh[:r]).view_as(lora_a.weight))
            # Subtract what the stored (possibly low-precision) factors really add back, not the exact SVD.
            added = s * (lora_b.weight.flatten(1).float() @ lora_a.weight.flatten(1).float())
            weight[rows] = (block - added).view_as(weight[rows]).to(weight.dtype)
