"""Write ``last.ckpt`` every N optimizer steps, so a crash loses at most N steps of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class StepCheckpoint(L.Callback):
    """Save the full training state (weights, optimizer, schedule, loop and data position) every N steps.

    It writes the same ``last.ckpt`` that ModelCheckpoint refreshes after each validation, so
    ``ckpt_path=last`` always resumes from the most recent of the two. ``every_n_steps`` of 0 or
    null turns it off (``last.ckpt`` is then only written at validation).
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = 100, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self.every_n_steps = int(every_n_steps or 0)
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        n = self.every_n_steps
        if n <= 0 or step == 0 or step % n or step == self._last_saved:
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._last_saved = step
        # Every rank calls this (it synchronises); only rank 0 writes.
        trainer.save_checkpoint(self.path, weights_only=False)
