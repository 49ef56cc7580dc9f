"""LoRA: W' = W + (α/r)·B·A on the layers ``model.targets`` full-matches (rsLoRA, PiSSA init, fused-qkv slices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ftlab.adapters import apply_lora, mark_trainable
from ftlab.adapters.lora import INITS
from ftlab.methods.adapted import AdaptedModule
from ftlab.validate import BOOLEAN, FRACTION, POSITIVE, POSITIVE_INT, Check, one_of


class LoRA(AdaptedModule):
    method = "lora"
    dora = False
    config_checks: ClassVar[dict[str, Check]] = {
        **AdaptedModule.config_checks,
        "rank": POSITIVE_INT,
        "alpha": POSITIVE,
        "dropout": FRACTION,
        "init": one_of(*INITS),
        "rslora": BOOLEAN,
    }

    def configure_trainable(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        rslora: bool = False,
        qkv: str | Sequence[str] | None = None,
    ) -> None:
        targets = self.resolve_targets("targets")
        self.wrap_errors(
            apply_lora, self.net, targets, rank=rank, alpha=alpha, dropout=dropout, init=init,
            rslora=rslora, dora=self.dora, qkv=qkv,
        )
        mark_trainable(self.net, extra=[self.head_name])
