"""Impossible values fail before any work starts, one line each, naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.errors import UserError


def _number(v: Any) -> bool:
    # bool is an int in Python, but `model.lr=true` is a mistake, not 1.0.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices, "one of " + ", ".join(str(c) for c in choices))


def _batches_limit(v: Any) -> bool:
    return v is None or (_integer(v) and v >= 0) or (_number(v) and 0.0 <= v <= 1.0)


def _devices(v: Any) -> bool:
    if v == "auto" or (_integer(v) and (v > 0 or v == -1)):
        return True
    if isinstance(v, str):  # "0,1" or "2"
        return all(part.strip().isdigit() for part in v.split(",") if part.strip())
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_integer(i) and i >= 0 for i in v)


# Lightning's precision names (a typo otherwise surfaces as a traceback from deep inside the Trainer).
PRECISIONS = ("32-true", "32", 32, "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", 64,
              "16", 16, "bf16", "transformer-engine", "transformer-engine-float16")

# key -> (check, what it must be). A key the chosen method/data/callbacks lack is skipped.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_integer, "an integer"),
    "model.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "model.backbone_lr_mult": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "model.warmup_ratio": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "model.freeze_norm_stats": (lambda v: isinstance(v, bool), "true or false"),
    # LoRA / DoRA
    "model.rank": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "model.alpha": (lambda v: _number(v) and v > 0, "a number > 0"),
    "model.dropout": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "model.init": _one_of("kaiming", "gaussian", "pissa"),
    "model.rslora": (lambda v: isinstance(v, bool), "true or false"),
    # partial / gradual
    "model.unfreeze_last": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "model.freeze_epochs": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "model.epochs_per_stage": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "model.unfreeze": _one_of("all", "stages"),
    # data
    "data.batch_size": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "data.val_fraction": (lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    "data.image_size": (lambda v: v is None or (_integer(v) and v >= 8), "null or an integer >= 8"),
    "data.crop_pct": (lambda v: v is None or (_number(v) and 0 < v <= 1), "null or in (0, 1]"),
    "data.crop_scale": (
        lambda v: len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
        "[min, max] with 0 < min <= max <= 1",
    ),
    "data.num_workers": (lambda v: v == "auto" or (_integer(v) and v >= 0), "auto or an integer >= 0"),
    "data.augment": _one_of("none", "basic", "strong"),
    "data.hflip": (lambda v: isinstance(v, bool), "true or false"),
    "data.check_images": (lambda v: isinstance(v, bool), "true or false"),
    "data.on_bad_image": _one_of("error", "skip"),
    "data.cache": (lambda v: isinstance(v, bool), "true or false"),
    "data.cache_features": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    # trainer
    "trainer.max_epochs": (lambda v: v is None or (_integer(v) and (v == -1 or v > 0)), "> 0 (or -1)"),
    "trainer.min_epochs": (lambda v: v is None or (_integer(v) and v >= 0), "null or an integer >= 0"),
    "trainer.accumulate_grad_batches": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0"),
    "trainer.devices": (_devices, "auto, a positive integer, -1, or a list of device indices"),
    "trainer.num_nodes": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "trainer.precision": (lambda v: v in PRECISIONS,
                          "one of 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true"),
    "trainer.log_every_n_steps": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "trainer.check_val_every_n_epoch": (lambda v: v is None or (_integer(v) and v > 0),
                                        "null or a positive integer"),
    "trainer.limit_train_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.limit_val_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.limit_test_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.profiler": (lambda v: v is None or v in ("simple", "advanced", "pytorch", "xla") or isinstance(v, (dict, DictConfig)),
                         "null, simple, advanced, pytorch or a _target_ node"),
    "trainer.compile": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.channels_last": (lambda v: isinstance(v, bool), "true or false"),
    # callbacks
    "callbacks.step_checkpoint.every_n_steps": (lambda v: v is None or (_integer(v) and v >= 0),
                                                "null or an integer >= 0 (0: off)"),
    "callbacks.early_stopping.patience": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for the first key whose value is impossible."""
    for key, (ok, expected) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if isinstance(value, str) and value == "__absent__":
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            good = ok(value)
        except (TypeError, ValueError, AttributeError):
            good = False
        if not good:
            raise UserError(f"{key}={value!r}: must be {expected}")
