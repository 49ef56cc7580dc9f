"""Partial fine-tuning: the last ``unfreeze_last`` blocks (timm's grouping) or a regex of parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ftlab.errors import UserError
from ftlab.methods.groups import backbone_groups, head_names, parameters_matching, set_trainable
from ftlab.module import ClassifierModule
from ftlab.validate import NON_NEGATIVE_INT, Check


class PartialFineTuning(ClassifierModule):
    method = "partial"
    config_checks: ClassVar[dict[str, Check]] = {**ClassifierModule.config_checks, "unfreeze_last": NON_NEGATIVE_INT}

    def configure_trainable(self, unfreeze_last: int = 2, trainable: str | Sequence[str] | None = None) -> None:
        if trainable:
            names = parameters_matching(self.net, trainable, "model.trainable")
        else:
            groups = backbone_groups(self.net, self.head_name)
            if not 0 <= unfreeze_last <= len(groups):
                raise UserError(f"model.unfreeze_last={unfreeze_last}: this backbone has {len(groups)} blocks")
            names = [n for g in groups[len(groups) - unfreeze_last:] for n in g]
        set_trainable(self.net, names + head_names(self.net, self.head_name))
