"""Loading weight files safely: safetensors, or torch files with ``weights_only=True`` (never full pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ftlab.errors import UserError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file, refusing anything that needs unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: refused to load (only plain tensors are accepted: {first})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return obj


def _strip_prefix(sd: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ('module.', 'model.', 'net.', 'backbone.') when that makes keys match."""
    if set(sd) & keys:
        return sd
    for prefix in ("module.", "model.", "net.", "backbone.", "model.net."):
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if set(stripped) & keys:
            return stripped
    return sd


def load_into(model: nn.Module, path: str | Path, head_name: str | None) -> None:
    """Load a checkpoint into ``model``; head tensors of another class count are skipped, all else must fit."""
    sd = read_state_dict(path)
    own = model.state_dict()
    sd = _strip_prefix(sd, set(own))
    head_prefix = f"{head_name}." if head_name else None
    filtered: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if head_prefix and key.startswith(head_prefix):
                continue
            raise UserError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
        filtered[key] = value
    missing = [k for k in own if k not in filtered and not (head_prefix and k.startswith(head_prefix))]
    if missing:
        raise UserError(f"{path}: {len(missing)} model tensors missing from the file, e.g. {', '.join(missing[:3])}")
    model.load_state_dict(filtered, strict=False)
