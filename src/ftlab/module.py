"""The one LightningModule every strategy shares: loss, metrics, optimizer and schedule live here.

A strategy (``ftlab.methods``) subclasses :class:`ClassifierModule` and only decides which
parameters exist and train (:meth:`configure_trainable`) and which of them are new
(:meth:`new_parameter_names`, trained at ``lr``; pretrained ones at ``lr * backbone_lr_mult``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.adapters import adapter_params, adapter_state_keys
from ftlab.artifacts import BASE_KEYS, base_rebuildable
from ftlab.base_weights import BaseFingerprint, describe_base, drop_base, restore_base
from ftlab.data.imbalance import valid_class_weights
from ftlab.errors import UserError
from ftlab.models import build_backbone
from ftlab.models.head_dropout import set_head_dropout
from ftlab.speed import fused_optimizer_arguments, to_channels_last
from ftlab.tta import tta_logits
from ftlab.validate import BOOLEAN, FRACTION, NON_NEGATIVE, POSITIVE, Check, number

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
# model.layer_decay: null or 1.0 (off), else a factor in (0, 1].
LAYER_DECAY: Check = (lambda v: v is None or (number(v) and 0 < v <= 1), "null or in (0, 1]")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # compute_groups would share state between top-1 F1 and top-5 accuracy (same shapes) and corrupt F1.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Per-step multiplier: linear warm-up from ~0 to 1, then cosine decay to 0."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class ClassifierModule(L.LightningModule):
    """Fine-tune a pretrained backbone with a new head; subclasses choose what trains."""

    method = "full"
    # model.<key> -> check, applied before any work (ftlab.validate); subclasses add their method's keys.
    config_checks: ClassVar[dict[str, Check]] = {
        "lr": POSITIVE,
        "backbone_lr_mult": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "label_smoothing": FRACTION,
        "warmup_ratio": FRACTION,
        "freeze_norm_stats": BOOLEAN,
        "layer_decay": LAYER_DECAY,
        "class_weights": (valid_class_weights, "null, auto or a list of numbers >= 0, one per class"),
    }

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        source: str = "timm",
        name: str = "resnet18",
        pretrained: bool = True,
        weights: str | None = "DEFAULT",
        checkpoint: str | None = None,
        lr: float = 1e-3,
        backbone_lr_mult: float = 1.0,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        warmup_ratio: float = 0.1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        freeze_norm_stats: bool = False,
        targets: str | Sequence[str] | None = "auto",
        ssf_targets: str | Sequence[str] | None = "auto",
        head_dropout: float | None = None,
        pooling: str | None = None,
        encoder_dropout: float | None = None,
        layer_decay: float | None = None,
        class_weights: Sequence[float] | None = None,
        **method_kwargs: Any,
    ) -> None:
        super().__init__()
        # The optimizer partial is code, not a hyper-parameter worth pickling into checkpoints.
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer or torch.optim.AdamW
        # pooling / encoder_dropout: text encoders only (model.source=hf).
        backbone = build_backbone(source, name, num_classes, pretrained, weights, checkpoint,
                                  pooling=pooling, encoder_dropout=encoder_dropout)
        if head_dropout is not None:  # null keeps the backbone's own dropout before the classifier
            set_head_dropout(backbone.net, backbone.head_name, head_dropout)
        self.net = backbone.net
        self.head_name = backbone.head_name
        self.data_config = backbone.data_config
        self.weight_source = backbone.weight_source
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # model.class_weights (ftlab.data.imbalance; `auto` is resolved from the train split by ftlab.train.build):
        # per-class weights of the training loss. Not persistent: the hyper-parameters hold them.
        self.register_buffer("class_weight", self._class_weight_tensor(class_weights, num_classes), persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.val_acc_best = MaxMetric()
        # The frozen base's sha256 for PEFT checkpoints (ftlab.base_weights), each tensor hashed once.
        self.base_fingerprint = BaseFingerprint()
        self._base_logged = False
        self.configure_trainable(**method_kwargs)
        if layer_decay is not None and layer_decay != 1:
            self.layer_scales()  # a network without block grouping fails here, before any work

    # -- what a strategy decides -------------------------------------------------------------
    def configure_trainable(self, **method_kwargs: Any) -> None:
        """Full fine-tuning: every weight trains."""
        if method_kwargs:
            raise TypeError(f"{type(self).__name__} takes no method keys, got {sorted(method_kwargs)}")
        self.net.requires_grad_(True)

    def new_parameter_names(self) -> set[str]:
        """Parameters created for the task (head, adapters): trained at the full ``lr``."""
        prefix = f"net.{self.head_name}."
        return {n for n, _ in self.named_parameters() if n.startswith(prefix)}

    def optimizer_parameter_names(self) -> set[str]:
        """Parameters handed to the optimizer: those that train now (gradual adds later ones too)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def artifact_prefixes(self) -> list[str] | None:
        """Module/tensor paths (in ``net``) that, with the adapters, make this run's artifact.

        ``None`` means the whole network (full fine-tuning). Otherwise: the head, every trainable
        pretrained tensor, and BatchNorm running statistics when they were re-estimated.
        """
        adapters = set(adapter_params(self.net))
        head = self.head_name
        names = [n for n, p in self.net.named_parameters()
                 if p.requires_grad and n not in adapters and not (n == head or n.startswith(head + "."))]
        if not self.hparams.get("freeze_norm_stats"):
            names += [n for n, _ in self.net.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
        return [head, *names]

    # -- frozen normalisation statistics --------------------------------------------------
    def _hold_norm_stats(self) -> None:
        # A frozen backbone keeps its running statistics: norm layers stay in eval mode.
        if self.hparams.get("freeze_norm_stats"):
            for module in self.net.modules():
                if isinstance(module, _NORM_TYPES):
                    module.eval()

    def train(self, mode: bool = True) -> ClassifierModule:
        super().train(mode)
        if mode:
            self._hold_norm_stats()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores per-module training flags around validation without calling train(),
        # so the eval mode of frozen norm layers is re-asserted before every step (on cached features
        # the backbone does not run, and walking its modules would be most of a step's cost).
        if self.feature_head is None:
            self._hold_norm_stats()

    # -- forward / steps ---------------------------------------------------------------------
    # Set by trainer.channels_last (ftlab.speed). Converted in forward rather than in on_after_batch_transfer,
    # which makes Lightning warn on every run that uses a DataModule.
    channels_last = False

    # Set while fitting on cached backbone features (data.cache_features, ftlab.data.feature_cache):
    # batches then hold the head's input, and only the head runs.
    feature_head: Callable[[torch.Tensor], torch.Tensor] | None = None

    # Set by the run's test_tta (ftlab.tta): the test stage averages the logits of the image and its mirror.
    test_tta: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_head is not None:
            return self.feature_head(x)
        return self.net(to_channels_last(x) if self.channels_last else x)

    # Set by ftlab.train.build from data.mixup / data.cutmix (ftlab.data.mixup.BatchMixup): training batches
    # are mixed and trained on probability targets.
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _class_weight_tensor(class_weights: Any, num_classes: int) -> torch.Tensor | None:
        if class_weights is None:
            return None
        if isinstance(class_weights, str) or not valid_class_weights(list(class_weights)):
            raise UserError(f"model.class_weights={class_weights!r}: must be a list of numbers >= 0, one per class "
                            "(auto is resolved from the train split by a run)")
        if len(class_weights) != num_classes:
            raise UserError(f"model.class_weights={list(class_weights)!r}: {len(class_weights)} weights for "
                            f"{num_classes} classes; give one per class")
        return torch.tensor([float(w) for w in class_weights])

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with ``model.class_weights``; ``y``: class indices, or probability targets (mixup/cutmix,
        label smoothing already folded in)."""
        if y.is_floating_point():
            return nn.functional.cross_entropy(logits, y, weight=self.class_weight)
        return nn.functional.cross_entropy(logits, y, weight=self.class_weight,
                                           label_smoothing=self.hparams.get("label_smoothing", 0.0))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
            # A mixed sample counts as right when the prediction is its dominant label.
            y = target.argmax(dim=1)
        logits = self(x)
        loss = self.training_loss(logits, target)
        # update(), not forward(): only the epoch value is logged, so no per-batch accuracy is computed.
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection
    ) -> torch.Tensor:
        x, y = batch
        logits = tta_logits(self, x, self.test_tta if stage == "test" else None)
        loss = self.criterion(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(y))
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict(values, prog_bar=False)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The logits reach callbacks' on_test_batch_end (ftlab.eval_report: confusion matrix, worst errors).
        return self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    # -- optimisation --------------------------------------------------------------------------
    def layer_scales(self) -> dict[str, tuple[int, float]]:
        """``model.layer_decay``: (layer index, lr factor) per parameter name (``net.`` prefixed).

        timm's block grouping (``group_matcher(coarse=False)``, as ``timm.optim.param_groups_layer_decay``
        uses it): layer ``i`` of ``L`` trains at ``layer_decay ** (L - 1 - i)``; the head (timm's last group)
        at 1. Adapters count in the layer of the module they adapt.
        """
        decay = self.hparams.get("layer_decay")
        matcher = getattr(self.net, "group_matcher", None)
        if not callable(matcher):
            raise UserError(f"model.layer_decay={decay}: {self.hparams.get('name')} has no block grouping "
                            "(a timm group_matcher); use a timm or Hugging Face model, or model.layer_decay=null")
        from timm.models import group_parameters

        layers = group_parameters(self.net, matcher(coarse=False), reverse=True)
        last = max(layers.values())
        head = self.head_name
        out = {}
        for name, layer in layers.items():
            layer = last if name == head or name.startswith(head + ".") else layer
            out[f"net.{name}"] = (layer, float(decay) ** (last - layer))
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """Head/adapters at ``lr``, pretrained weights at ``lr * backbone_lr_mult``; no decay on norms/biases.

        With ``model.layer_decay`` each of these groups is split by depth (timm's block grouping), its lr
        scaled by ``layer_decay ** (layers below the head)``; group names end in ``_layer<i>``.
        """
        hp = self.hparams
        new = self.new_parameter_names()
        decay_on = hp.get("layer_decay") is not None and hp.get("layer_decay") != 1
        scales = self.layer_scales() if decay_on else {}
        groups: dict[tuple[str, bool, int], list[nn.Parameter]] = {}
        factor: dict[int, float] = {}
        include = self.optimizer_parameter_names()
        for name, param in self.named_parameters():
            if name not in include:
                continue
            layer, scale = scales.get(name, (-1, 1.0))
            factor[layer] = scale
            key = ("new" if name in new else "pretrained", param.ndim > 1, layer)
            groups.setdefault(key, []).append(param)
        out = []
        for (kind, decay, layer), params in sorted(groups.items()):
            lr = hp.lr if kind == "new" else hp.lr * hp.backbone_lr_mult
            out.append(
                {
                    "params": params,
                    "lr": lr * factor[layer],
                    "weight_decay": hp.weight_decay if decay else 0.0,
                    "name": f"{kind}{'' if decay else '_no_decay'}{f'_layer{layer}' if layer >= 0 else ''}",
                }
            )
        return out

    def make_optimizer(self) -> torch.optim.Optimizer:
        """``model.optimizer`` over :meth:`param_groups`, with torch's fused kernel where it is safe
        (:func:`ftlab.speed.fused_optimizer_arguments`)."""
        groups = self.param_groups()
        extra = fused_optimizer_arguments(self.optimizer_factory, groups, self._trainer)
        if extra:
            log.info("model.optimizer: %s with torch's fused kernel", getattr(self.optimizer_factory, "func",
                                                                               self.optimizer_factory).__name__)
        return self.optimizer_factory(groups, **extra)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, self.hparams.warmup_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_keys(self) -> set[str] | None:
        """The state-dict keys a training checkpoint stores; ``None``: all of them.

        A method whose frozen weights are the pretrained base stores what its artifact holds (adapters,
        PiSSA residuals, head, trained pretrained tensors, re-estimated norm statistics) and leaves the base
        to be rebuilt from its source (:mod:`ftlab.base_weights`).
        """
        return self.keys_beside_base(self.artifact_prefixes())

    def keys_beside_base(self, prefixes: list[str] | None) -> set[str] | None:
        """:meth:`checkpoint_keys` from artifact prefixes (``None``: the whole network). Checkpoints stay whole
        when the base is in no file (``model.pretrained=false``) and under FSDP (sharded state dicts)."""
        if prefixes is None or not base_rebuildable(self.hparams):
            return None
        if self._trainer is not None:
            from ftlab.distributed import is_sharded

            if is_sharded(self._trainer):
                return None
        state = self.net.state_dict()
        keys = set(adapter_state_keys(self.net, prefixes, state))
        keys |= {n for n, p in self.net.named_parameters() if p.requires_grad}
        # A re-estimated norm layer's batch count changes with its statistics.
        keys |= {k[: -len("running_mean")] + "num_batches_tracked" for k in keys if k.endswith(".running_mean")}
        return {f"net.{k}" for k in keys if k in state} | {k for k in self.state_dict() if not k.startswith("net.")}

    def base_record(self) -> dict[str, Any]:
        """Where the frozen base comes from, as a PEFT checkpoint names it."""
        return {**{k: self.hparams.get(k) for k in BASE_KEYS}, "weight_source": self.weight_source}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint copied out of its run directory still names its class and preprocessing
        # (plain types only, so it loads with torch.load(weights_only=True)); see ftlab.inference.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        pre = getattr(datamodule, "preprocessing", None) or self.data_config
        checkpoint["ftlab"] = {
            "target": f"{type(self).__module__}.{type(self).__qualname__}",
            "preprocessing": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in pre.items()},
        }
        keys = self.checkpoint_keys()
        if keys is None:
            return
        record = drop_base(checkpoint, keys, self.state_dict(), self.base_record(), self.base_fingerprint)
        if record is not None and not self._base_logged:
            self._base_logged = True
            log.info("checkpoints hold the %d trained tensors; the frozen base (%d tensors, sha256 %s) is rebuilt "
                     "from %s when loading", len(checkpoint["state_dict"]), len(record["frozen"]),
                     record["sha256"][:16], describe_base(record))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        origin = self._trainer.ckpt_path if self._trainer is not None else None
        self.restore_base(checkpoint, str(origin or "checkpoint"))

    def restore_base(self, checkpoint: dict[str, Any], origin: str) -> bool:
        """Complete a PEFT checkpoint's weights with this model's frozen base, after checking its sha256."""
        source = self if self.base_intact() else self.fresh_copy()
        return restore_base(checkpoint, source.state_dict(), source.base_fingerprint, origin)

    def base_intact(self) -> bool:
        """Whether the frozen tensors still hold the base (``gradual`` trains them once it unfreezes)."""
        return True

    def fresh_copy(self) -> ClassifierModule:
        """The module as built from its hyper-parameters, base and all (the global random state is kept)."""
        with torch.random.fork_rng(devices=[]):
            return type(self)(**self.hparams)

    # -- reporting -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.net.parameters())
        trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        return {"params_total": total, "params_trainable": trainable}
