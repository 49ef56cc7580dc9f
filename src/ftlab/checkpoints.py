"""Checkpoint files: refuse unsafe ones before Lightning touches them, and write them atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ftlab.errors import UserError

# What a Lightning training checkpoint holds at the top level (and ftlab's hold nothing else to unpickle).
_REQUIRED = ("state_dict", "global_step", "loops")


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`UserError` unless ``path`` is a Lightning checkpoint that loads with ``weights_only``.

    The restricted unpickler never runs code from the file (no ``__reduce__`` calls); memory mapping
    keeps the check cheap for large checkpoints. Lightning then loads it again, also with
    ``weights_only=True`` (see :func:`ftlab.train.run`).
    """
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # A file in torch's legacy (pre-zip) format cannot be memory-mapped: read it plainly.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"ckpt_path={path}: refused to load (only tensors and plain values are allowed: {first})"
        ) from None
    missing = [k for k in _REQUIRED if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"ckpt_path={path}: not a Lightning training checkpoint (no {', '.join(missing)})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, then rename: a kill never leaves half a checkpoint.

    Lightning's own writer stages the file in the system temp dir and moves it, which is a copy (not
    atomic) when the run directory is on another file system.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        target = str(path)
        if "://" in target or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
