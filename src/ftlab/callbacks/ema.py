"""``callbacks=ema``: an exponential moving average of the weights, validated, tested and saved.

Lightning's own :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` does the work: it keeps an
``AveragedModel`` (parameters and buffers, BatchNorm running statistics included), swaps it in for every
validation, writes it as the checkpoint's ``state_dict`` (the training weights go to
``current_model_state``) and copies it into the model when training ends. This subclass changes three
things:

- **test**: Lightning's ``on_load_checkpoint`` puts ``current_model_state`` (the training weights) back
  into the model whenever the callback still holds an average, which is the case for ``trainer.test``
  after ``trainer.fit``; outside fitting the checkpoint's ``state_dict`` (the average) is kept instead,
  so the test stage and the artifact written after it use the EMA weights of the best checkpoint;
- **the update** is ``ema += (1 - decay_t) * (weights - ema)``, which leaves tensors that do not change
  (frozen pretrained weights under PEFT, frozen norm statistics) bit-identical, and with ``warmup`` the
  decay ramps up as ``decay_t = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
  ``num_updates``), so a short fine-tuning run averages its recent steps, not its first ones;
- **step checkpoints** (``callbacks.step_checkpoint``) written at the end of a batch hold that batch's
  average even when they are written before this callback's own batch-end hook.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from ftlab.errors import UserError

log = logging.getLogger(__name__)


def ema_update(decay: float, warmup: bool) -> Any:
    """``avg_fn`` for :class:`torch.optim.swa_utils.AveragedModel`: one EMA step, exact for unchanged tensors."""

    @torch.no_grad()
    def update(average: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        if not average.is_floating_point():  # num_batches_tracked: follow the model
            return current
        return average + (1.0 - d) * (current - average)

    return update


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging whose averaged weights are also the ones tested (see the module doc)."""

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.decay = decay
        self.warmup = warmup
        # Handed to AveragedModel in setup(); replaces the parent's plain decay * ema + (1 - decay) * w.
        self._kwargs["avg_fn"] = ema_update(decay, warmup)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from ftlab.distributed import is_sharded

        if stage == "fit" and is_sharded(trainer):
            # The average is a whole copy of the module on every rank; Lightning's callback cannot shard it.
            raise UserError("callbacks=ema: not with a sharded strategy (trainer=fsdp); use trainer=ddp")
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None and trainer.state.fn == TrainerFn.FITTING and trainer.training:
            # The update on_train_batch_end would make for this step (a no-op when it already ran).
            self.on_train_batch_end(trainer, pl_module, None, None, 0)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            # test/validate/predict: the model already holds the checkpoint's state_dict, the average.
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
