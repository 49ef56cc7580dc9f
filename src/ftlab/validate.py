"""Impossible values fail before any work starts, one line each, naming the key.

:data:`CHECKS` covers the keys every run has (seed, trainer, callbacks). The keys of a method or a data
source are checked by their own class: ``config_checks`` on the ``model._target_`` / ``data._target_``
class (``ftlab.methods.LoRA.config_checks`` ...), written with the helpers here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.errors import UserError


def number(v: Any) -> bool:
    # bool is an int in Python, but `model.lr=true` is a mistake, not 1.0.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# (predicate, what the value must be)
Check = tuple[Callable[[Any], bool], str]


def one_of(*choices: Any) -> Check:
    return (lambda v: v in choices, "one of " + ", ".join(str(c) for c in choices))


BOOLEAN: Check = (lambda v: isinstance(v, bool), "true or false")
POSITIVE_INT: Check = (lambda v: integer(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT: Check = (lambda v: integer(v) and v >= 0, "an integer >= 0")
POSITIVE: Check = (lambda v: number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Check = (lambda v: number(v) and v >= 0, "a number >= 0")
FRACTION: Check = (lambda v: number(v) and 0 <= v < 1, "in [0, 1)")
WORKERS: Check = (lambda v: v == "auto" or (integer(v) and v >= 0), "auto or an integer >= 0")


def _batches_limit(v: Any) -> bool:
    return v is None or (integer(v) and v >= 0) or (number(v) and 0.0 <= v <= 1.0)


def _devices(v: Any) -> bool:
    if v == "auto" or (integer(v) and (v > 0 or v == -1)):
        return True
    if isinstance(v, str):  # "0,1" or "2"
        return all(part.strip().isdigit() for part in v.split(",") if part.strip())
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(integer(i) and i >= 0 for i in v)


# Lightning's precision names (a typo otherwise surfaces as a traceback from deep inside the Trainer).
PRECISIONS = ("32-true", "32", 32, "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", 64,
              "16", 16, "bf16", "transformer-engine", "transformer-engine-float16")

# key -> (check, what it must be). A key the chosen method/data/callbacks lack is skipped.
CHECKS: dict[str, Check] = {
    "seed": (integer, "an integer"),
    "test_tta": (lambda v: v is None or v == "hflip", "null or hflip"),
    # trainer
    "trainer.max_epochs": (lambda v: v is None or (integer(v) and (v == -1 or v > 0)), "> 0 (or -1)"),
    "trainer.min_epochs": (lambda v: v is None or (integer(v) and v >= 0), "null or an integer >= 0"),
    "trainer.accumulate_grad_batches": (lambda v: integer(v) and v > 0, "a positive integer"),
    "trainer.gradient_clip_val": (lambda v: v is None or (number(v) and v >= 0), "null or a number >= 0"),
    "trainer.devices": (_devices, "auto, a positive integer, -1, or a list of device indices"),
    "trainer.num_nodes": (lambda v: integer(v) and v > 0, "a positive integer"),
    "trainer.precision": (lambda v: v in PRECISIONS,
                          "one of 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true"),
    "trainer.log_every_n_steps": (lambda v: integer(v) and v > 0, "a positive integer"),
    "trainer.check_val_every_n_epoch": (lambda v: v is None or (integer(v) and v > 0),
                                        "null or a positive integer"),
    "trainer.limit_train_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.limit_val_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.limit_test_batches": (_batches_limit, "null, an integer >= 0 or a fraction in [0, 1]"),
    "trainer.profiler": (lambda v: v is None or v in ("simple", "advanced", "pytorch", "xla") or isinstance(v, (dict, DictConfig)),
                         "null, simple, advanced, pytorch or a _target_ node"),
    "trainer.compile": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.channels_last": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    # callbacks
    "callbacks.step_checkpoint.every_n_steps": (lambda v: v is None or (integer(v) and v >= 0),
                                                "null or an integer >= 0 (0: off)"),
    "callbacks.early_stopping.patience": (lambda v: integer(v) and v >= 0, "an integer >= 0"),
    # experiment=compare_tuned (its method list and search spaces: ftlab.compare_tuned.check_tune)
    "tune.trials": POSITIVE_INT,
    "tune.epochs": POSITIVE_INT,
    "tune.startup_trials": NON_NEGATIVE_INT,
    "tune.sampler_seed": (integer, "an integer"),
    "tune.seeds": POSITIVE_INT,
    "tune.final_epochs": (lambda v: v is None or (integer(v) and v > 0), "null or a positive integer"),
    "tune.metric": (lambda v: isinstance(v, str) and v.startswith("val/"),
                    "a validation metric (val/...): the test split is never used to choose"),
    "callbacks.ema.decay": (lambda v: number(v) and 0 < v < 1, "in (0, 1)"),
    "callbacks.ema.warmup": (lambda v: isinstance(v, bool), "true or false"),
    "callbacks.ema.update_every_n_steps": (lambda v: integer(v) and v > 0, "a positive integer"),
    "callbacks.ema.update_starting_at_step": (lambda v: v is None or (integer(v) and v >= 0),
                                              "null or an integer >= 0"),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for the first key whose value is impossible."""
    check_keys(cfg, CHECKS)
    for node in ("model", "data"):
        target = OmegaConf.select(cfg, f"{node}._target_", default=None)
        if not target:
            continue
        try:
            cls = get_class(str(target))
        except Exception as exc:
            raise UserError(f"{node}._target_={target}: cannot import it ({type(exc).__name__})") from None
        check_keys(cfg, {f"{node}.{key}": check for key, check in getattr(cls, "config_checks", {}).items()})


def check_keys(cfg: DictConfig, checks: dict[str, Check]) -> None:
    """Apply ``checks`` (full key -> check); a key the config lacks is skipped."""
    for key, (ok, expected) in checks.items():
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
