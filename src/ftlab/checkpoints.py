"""Checkpoint files: refuse unsafe ones before Lightning touches them, and write them atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ftlab.errors import UserError
from ftlab.fileio import atomic_open, disk_full_error, is_disk_full

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


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``ckpt_path=`` as a checked file path: ``last`` is the run directory's ``checkpoints/last.ckpt``."""
    if not ckpt_path:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        hint = " (resume inside the run's directory: add hydra.run.dir=<run dir>)" if ckpt_path == "last" else ""
        raise UserError(f"ckpt_path={ckpt_path}: {path} does not exist{hint}")
    check_checkpoint(path)  # refuse pickled code with a clear message before Lightning loads it
    return str(path)


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
        try:
            with atomic_open(target, "wb") as f:
                torch.save(checkpoint, f)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            kept = (f"the last good checkpoint {target} is kept" if os.path.exists(target)
                    else "no checkpoint was written")
            raise disk_full_error(target, tensor_bytes(checkpoint), kept) from None


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about what the file needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
