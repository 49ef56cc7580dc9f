"""PEFT checkpoints without the frozen base: leave it out on save, check and put it back on load.

A method whose frozen weights are the pretrained base (linear, bitfit, partial, ssf, lora, dora; gradual
before it unfreezes) stores in its Lightning checkpoints only the tensors training changes (see
:meth:`ftlab.module.ClassifierModule.checkpoint_keys`). The rest of the state dict, the frozen base, is
rebuilt from its source by building the model from the checkpoint's hyper-parameters, exactly as a run
builds it. The checkpoint's ``ftlab_base`` entry (plain types: it loads with ``weights_only=True``) says
which base that is and fingerprints it::

    {"source": "efficientnet_lite0", "name": ..., "pretrained": true, "weights": ..., "checkpoint": null,
     "weight_source": "...", "sha256": "<hex>", "frozen": {"net.conv_stem.weight": "float32", ...}}

``sha256`` covers every omitted tensor (name, dtype, shape and bytes) in key order; ``frozen`` lists them
with the dtype they had when saved. On load the freshly built base must hash the same (a changed base is a
:class:`UserError` naming both hashes); its tensors then fill the omitted keys, so the state dict loads
strictly, and a key missing outside ``frozen`` is still an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from ftlab.errors import UserError

BASE_KEY = "ftlab_base"
# Where a checkpoint holds module weights: the weights, and under callbacks=ema the training weights beside
# the average (Lightning's EMAWeightAveraging). Frozen tensors are the same in both (ftlab.callbacks.ema).
STATE_KEYS = ("state_dict", "current_model_state")


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C-contiguous, so memory layout does not matter)."""
    t = tensor.detach()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest.update(data.numpy().data)
    return digest.hexdigest()


def _dtype(name: Any, origin: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"{origin}: its {BASE_KEY} entry names an unknown dtype {name!r}")
    return dtype


class BaseFingerprint:
    """sha256 over the frozen base tensors in key order.

    Each tensor is hashed once (they do not change while frozen), so a run pays the hash of its base once,
    not at every checkpoint.
    """

    def __init__(self) -> None:
        self._digests: dict[tuple[str, str], str] = {}

    def __call__(self, live: Mapping[str, torch.Tensor], frozen: Mapping[str, str], origin: str = "") -> str:
        total = hashlib.sha256()
        for key, dtype in frozen.items():
            digest = self._digests.get((key, dtype))
            if digest is None:
                digest = tensor_digest(live[key].to(_dtype(dtype, origin)))
                self._digests[(key, dtype)] = digest
            total.update(f"{key}\0{digest}\n".encode())
        return total.hexdigest()


def drop_base(
    checkpoint: dict[str, Any], stored: set[str], live: Mapping[str, torch.Tensor], base: dict[str, Any],
    fingerprint: BaseFingerprint,
) -> dict[str, Any] | None:
    """Leave every key outside ``stored`` out of ``checkpoint``'s weights and add its ``ftlab_base`` record.

    ``live``: the model's own state dict, which the fingerprint is taken from. Returns the record, or None
    when nothing was left out.
    """
    state = checkpoint["state_dict"]
    frozen = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if k not in stored and k in live}
    if not frozen:
        return None
    record = {**base, "sha256": fingerprint(live, frozen), "frozen": frozen}
    for name in STATE_KEYS:
        weights = checkpoint.get(name)
        if isinstance(weights, dict):
            checkpoint[name] = {k: v for k, v in weights.items() if k not in frozen}
    checkpoint[BASE_KEY] = record
    return record


def describe_base(record: Mapping[str, Any]) -> str:
    where = record.get("weight_source") or record.get("checkpoint") or record.get("source")
    return f"{record.get('name')} ({where})"


def restore_base(
    checkpoint: dict[str, Any], live: Mapping[str, torch.Tensor], fingerprint: BaseFingerprint, origin: str
) -> bool:
    """Fill ``checkpoint``'s weights with the frozen base tensors of ``live`` (the freshly built model), after
    checking they are the ones it was trained on. Returns False for a checkpoint that holds every tensor."""
    record = checkpoint.get(BASE_KEY)
    if record is None:
        return False
    frozen, saved = (record.get("frozen"), record.get("sha256")) if isinstance(record, dict) else (None, None)
    if not isinstance(frozen, dict) or not isinstance(saved, str):
        raise UserError(f"{origin}: its {BASE_KEY} entry is damaged (no frozen keys or sha256)")
    absent = [k for k in frozen if k not in live]
    if absent:
        raise UserError(f"{origin}: the model built from its hyper-parameters lacks {len(absent)} of the base tensors "
                        f"the checkpoint leaves to it, e.g. {absent[0]}")
    dtypes = {k: _dtype(v, origin) for k, v in frozen.items()}
    now = fingerprint(live, frozen, origin)
    if now != saved:
        raise UserError(f"{origin}: the base weights changed since this checkpoint was written: trained on "
                        f"{describe_base(record)} with sha256 {saved}, the base built now has sha256 {now}; "
                        "restore the original base weights")
    for name in STATE_KEYS:
        weights = checkpoint.get(name)
        if isinstance(weights, dict):
            for key, dtype in dtypes.items():
                if key not in weights:
                    weights[key] = live[key].detach().to(dtype)
    return True
