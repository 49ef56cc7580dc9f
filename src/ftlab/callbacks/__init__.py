"""Lightning callbacks ftlab adds to every run: step checkpoints and the non-finite loss guard; ``EMA``
for ``callbacks=ema``."""

from ftlab.callbacks.ema import EMA
from ftlab.callbacks.non_finite import NonFiniteGuard
from ftlab.callbacks.step_checkpoint import StepCheckpoint

__all__ = ["EMA", "NonFiniteGuard", "StepCheckpoint"]
