"""Gradual unfreezing: the head alone for ``freeze_epochs``, then the backbone joins, block by block or at once.

What trains is a pure function of the epoch number, recomputed at every epoch start, so a resumed run
trains exactly the parameters the interrupted one would have (no callback state to lose on resume).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ftlab.errors import UserError
from ftlab.methods.groups import backbone_groups, head_names, set_trainable
from ftlab.module import ClassifierModule
from ftlab.validate import NON_NEGATIVE_INT, POSITIVE_INT, Check, one_of

# model.unfreeze: the whole backbone at once, or one block per epochs_per_stage from the output end.
UNFREEZE = ("all", "stages")


class GradualUnfreezing(ClassifierModule):
    method = "gradual"
    config_checks: ClassVar[dict[str, Check]] = {
        **ClassifierModule.config_checks,
        "freeze_epochs": NON_NEGATIVE_INT,
        "epochs_per_stage": POSITIVE_INT,
        "unfreeze": one_of(*UNFREEZE),
    }

    def configure_trainable(self, freeze_epochs: int = 1, unfreeze: str = "all", epochs_per_stage: int = 1) -> None:
        if unfreeze not in UNFREEZE:
            raise UserError(f"model.unfreeze={unfreeze!r}: choose {' or '.join(UNFREEZE)}")
        if freeze_epochs < 0 or epochs_per_stage < 1:
            raise UserError("model.freeze_epochs must be >= 0 and model.epochs_per_stage >= 1")
        self.groups = backbone_groups(self.net, self.head_name)
        self.apply_schedule(0)

    def stages_unfrozen(self, epoch: int) -> int:
        """How many backbone blocks (counted from the output end) train in ``epoch``."""
        hp = self.hparams
        if epoch < hp.freeze_epochs:
            return 0
        if hp.get("unfreeze", "all") == "all":
            return len(self.groups)
        return min(len(self.groups), 1 + (epoch - hp.freeze_epochs) // hp.get("epochs_per_stage", 1))

    def apply_schedule(self, epoch: int) -> None:
        k = self.stages_unfrozen(epoch)
        names = [n for g in self.groups[len(self.groups) - k:] for n in g] if k else []
        set_trainable(self.net, names + head_names(self.net, self.head_name))

    # The latest epoch that has started training (in this process, or in the run a checkpoint resumes).
    _started_epoch = -1

    def on_train_epoch_start(self) -> None:
        self._started_epoch = max(self._started_epoch, self.current_epoch)
        self.apply_schedule(self.current_epoch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._started_epoch = max(self._started_epoch, int(checkpoint.get("epoch", 0)))

    def optimizer_parameter_names(self) -> set[str]:
        # Every parameter is in the optimizer from the start (frozen ones get no gradient, so AdamW skips
        # them), keeping param groups and optimizer state identical across unfreezing and resume.
        return {n for n, _ in self.named_parameters()}

    def artifact_prefixes(self) -> list[str] | None:
        return None  # the backbone ends up fully trained: the artifact is the whole model

    def base_intact(self) -> bool:
        # Until the backbone first unfreezes only the head has trained (the schedule never freezes again).
        head = self.head_name
        backbone_trains = any(p.requires_grad for n, p in self.net.named_parameters()
                              if not (n == head or n.startswith(head + ".")))
        return not backbone_trains and self.stages_unfrozen(max(self._started_epoch, 0)) == 0

    def checkpoint_keys(self) -> set[str] | None:
        # Checkpoints of the frozen epochs leave the pretrained base out, as a linear probe's do; later ones are
        # whole. Loading one of the former after unfreezing (the test stage's best.ckpt) rebuilds the base.
        if not self.base_intact():
            return None
        return self.keys_beside_base(ClassifierModule.artifact_prefixes(self))
