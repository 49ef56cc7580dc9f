"""Linear probe: only the new head trains; the backbone is frozen, BatchNorm statistics included."""

from __future__ import annotations

from typing import Any

from ftlab.methods.groups import head_names, set_trainable
from ftlab.module import ClassifierModule


class LinearProbe(ClassifierModule):
    method = "linear"

    def __init__(self, *args: Any, freeze_norm_stats: bool = True, **kwargs: Any) -> None:
        # Frozen means frozen: running statistics must not drift toward the new data either.
        super().__init__(*args, freeze_norm_stats=freeze_norm_stats, **kwargs)

    def configure_trainable(self) -> None:
        set_trainable(self.net, head_names(self.net, self.head_name))
