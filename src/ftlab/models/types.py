"""What every backbone builder returns (image or text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Backbone:
    net: nn.Module
    head_name: str
    # Pretrained preprocessing. Images: size, mean, std, interpolation, crop_pct; text: modality ("text"),
    # tokenizer (name or folder), max_length.
    data_config: dict[str, Any] = field(default_factory=dict)
    weight_source: str = "random"
