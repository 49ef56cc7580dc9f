"""Test-time augmentation: ``ftlab eval RUN tta=hflip`` and ``test_tta=hflip`` in a run.

``hflip`` runs the model on the image and on its mirror image and averages the two **logits** (not the
softmax probabilities): the result is still a logit vector, so the loss, the metrics and the reports
take it unchanged, and its softmax is the normalised geometric mean of the two predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ftlab.errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("hflip",)


def check_tta(value: Any, key: str, text: bool) -> str | None:
    """``value`` if it is a usable TTA for this model (``None``: off); a one-line error naming ``key`` otherwise."""
    if value is None:
        return None
    if value not in CHOICES:
        raise UserError(f"{key}={value!r}: must be null or one of {', '.join(CHOICES)}")
    if text:
        raise UserError(f"{key}={value}: text models have no horizontal flip (image models only)")
    return str(value)


def hflip_warning(key: str, data_hflip: Any) -> str | None:
    """The warning for ``hflip`` TTA on data whose config says mirrored images are not the same class."""
    if data_hflip is False:
        return (f"{key}=hflip: the run's data has data.hflip=false (mirrored images are not the same class, "
                "e.g. digits); the mirrored pass will likely cost accuracy")
    return None


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str | None) -> torch.Tensor:
    """``model(x)``, or with ``hflip`` the mean of ``model(x)`` and ``model(x flipped left-right)``."""
    logits = model(x)
    if tta == "hflip":
        logits = (logits + model(torch.flip(x, dims=(-1,)))) / 2
    return logits


def run_tta(cfg: Any) -> str | None:
    """A run's ``test_tta``, checked before any work (a text run is an error; a warning when the data config
    says mirrored images are not the same class)."""
    from omegaconf import OmegaConf

    tta = check_tta(cfg.get("test_tta"), "test_tta", text=OmegaConf.select(cfg, "model.source") == "hf")
    warning = hflip_warning("test_tta", OmegaConf.select(cfg, "data.hflip", default=None)) if tta else None
    if warning:
        log.warning(warning)
    return tta
