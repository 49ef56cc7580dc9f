"""``data.mixup`` / ``data.cutmix``: timm's :class:`~timm.data.Mixup` on training batches, with soft targets.

timm's ``Mixup`` (batch mode) blends every sample with its mirror in the batch (mixup: the whole images,
``lam ~ Beta(alpha, alpha)``; cutmix: a box pasted from the mirror image, ``lam`` its area share) and returns
the matching probability targets (label smoothing folded in). The module then trains on them with a
soft-target cross-entropy and counts a mixed sample as right when the prediction is its dominant label
(the larger share of its target). Validation and test see plain images.

It pairs samples, so it needs an even batch: ``data.batch_size`` must be even, and ``data.drop_last`` leaves
only full batches. A short batch that remains (a train split smaller than one batch, or
``data.drop_last=false``) mixes all but its last sample, which keeps its own target.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ftlab.errors import UserError

log = logging.getLogger(__name__)


def check_mixup_args(mixup: float, cutmix: float, batch_size: int) -> None:
    """Cross-key checks the per-key ``config_checks`` cannot make."""
    if (mixup or cutmix) and int(batch_size) % 2:
        keys = " and ".join(f"data.{k}={v}" for k, v in (("mixup", mixup), ("cutmix", cutmix)) if v)
        raise UserError(f"data.batch_size={batch_size}: {keys} mix the samples of a batch in pairs (timm's Mixup), "
                        "so the batch size must be even")


class BatchMixup:
    """timm's ``Mixup`` for a training batch of any size: ``(x, y) -> (mixed x, probability targets)``."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0) -> None:
        from timm.data import Mixup

        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.mix = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=float(prob),
                         switch_prob=float(switch_prob), mode="batch", label_smoothing=self.label_smoothing,
                         num_classes=self.num_classes)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Unmixed probability targets (label smoothing applied as on mixed ones)."""
        from timm.data.mixup import mixup_target

        return mixup_target(y, self.num_classes, 1.0, self.label_smoothing)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x) - len(x) % 2
        if n == 0:
            return x, self.targets(y)
        if n == len(x):
            return self.mix(x, y)
        # timm mixes in place: mixing the even prefix (a view) mixes x, and the last sample stays itself.
        _, mixed = self.mix(x[:n], y[:n])
        return x, torch.cat([mixed, self.targets(y[n:])])


def build_mixup(datamodule: Any, num_classes: int, label_smoothing: float = 0.0) -> BatchMixup | None:
    """The batch mixer ``data.mixup``/``data.cutmix`` ask for, or None when both are 0 (or the data has none)."""
    mixup, cutmix = float(getattr(datamodule, "mixup", 0) or 0), float(getattr(datamodule, "cutmix", 0) or 0)
    if not (mixup or cutmix):
        return None
    prob = float(getattr(datamodule, "mixup_prob", 1.0))
    switch_prob = float(getattr(datamodule, "mixup_switch_prob", 0.5))
    log.info("data.mixup=%g data.cutmix=%g: mixing %d%% of training batches%s", mixup, cutmix, round(100 * prob),
             f" (cutmix in {100 * switch_prob:.0f}% of them)" if mixup and cutmix else "")
    return BatchMixup(num_classes, mixup, cutmix, prob, switch_prob, label_smoothing)
