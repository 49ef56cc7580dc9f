"""Stop a run at the first NaN/inf loss or gradient, before it reaches the weights or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ftlab.errors import UserError


class NonFiniteGuard(L.Callback):
    """Raise a :class:`UserError` naming the step when the loss (or a gradient) is not finite.

    The loss is checked before backward and the gradients before the optimizer step, so the weights
    never take a non-finite update and no checkpoint can hold one: ``last.ckpt``/``best.ckpt`` stay
    those of the last good step. Under fp16 mixed precision the gradient check is left to the loss
    scaler, which skips overflowing steps on purpose.
    """

    def __init__(self, checkpoint_dir: str | None = None) -> None:
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None

    def _fail(self, trainer: L.Trainer, what: str, value: float) -> None:
        step = trainer.global_step + 1  # the optimizer step being computed
        batch = trainer.fit_loop.epoch_loop.batch_idx
        where = f"at step {step} (epoch {trainer.current_epoch}, batch {batch})"
        kept = ""
        last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
        if last is not None and last.is_file():
            kept = f"; the last good checkpoint {last} is kept"
        raise UserError(
            f"non-finite {what} ({value}) {where}: training stopped{kept}. "
            "Lower model.lr or raise model.warmup_ratio"
        )

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if not torch.isfinite(loss).all():
            self._fail(trainer, "loss", loss.detach().float().mean().item())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if str(trainer.precision).startswith("16"):
            return
        # The optimizer's parameters, not the whole model's: a frozen backbone has hundreds without gradients.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # The max-norm is NaN/inf exactly when some element is (a 2-norm could overflow on finite values).
        largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))
        if not torch.isfinite(largest):
            self._fail(trainer, "gradient", largest.item())
