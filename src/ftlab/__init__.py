"""ftlab: a fine-tuning lab for pretrained classifiers (full fine-tuning, PEFT and LoRA side by side).

The library in three calls, as ``python -m ftlab`` runs it::

    from ftlab import compose_config, run
    cfg = compose_config(["method=lora", "model.rank=16"], run_dir="outputs/my_run")
    metrics = run(cfg)          # fit, test, write metrics.json and the artifact

``build(cfg)`` returns the (datamodule, model, Trainer) without fitting. Adapters (LoRA, DoRA, SSF) are
in :mod:`ftlab.adapters`, the strategies in :mod:`ftlab.methods`, loading a trained run for inference in
:mod:`ftlab.inference`. Names are imported on first use, so ``import ftlab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {"compose_config": "ftlab.config", "build": "ftlab.train", "run": "ftlab.train",
           "UserError": "ftlab.errors", "load_predictor": "ftlab.inference"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ftlab' has no attribute {name!r}")
