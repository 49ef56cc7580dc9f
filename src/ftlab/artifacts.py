"""Deployable outputs of a run: a small adapter file, or the whole (optionally merged) model.

``adapter.safetensors`` holds the adapter tensors, the head, every other trained tensor and re-estimated
BatchNorm statistics; ``adapter.yaml`` says how to rebuild the base model and re-apply it. Full
fine-tuning (and gradual unfreezing, which ends fully trained) writes ``model.safetensors`` + ``model.yaml``.
``merge=true`` additionally folds adapters into plain layers and writes ``model.safetensors``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ftlab.adapters import adapter_config, load_adapter, merge_adapters, save_adapter
from ftlab.models import build_backbone
from ftlab.models.weights import read_state_dict

BASE_KEYS = ("source", "name", "pretrained", "weights", "checkpoint")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(module: nn.Module, preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """Everything needed to rebuild the model without the original config: base, classes, preprocessing."""
    hp = dict(module.hparams)
    method_keys = {k: v for k, v in hp.items() if k not in (*BASE_KEYS, "num_classes", "class_names")}
    return _plain(
        {
            "method": module.method,
            "target": f"{type(module).__module__}.{type(module).__qualname__}",
            "base_model": {**{k: hp.get(k) for k in BASE_KEYS}, "weight_source": module.weight_source},
            "head": module.head_name,
            "num_classes": hp["num_classes"],
            "class_names": list(module.class_names),
            "preprocessing": preprocessing or module.data_config,
            "method_config": method_keys,
            "adapter": adapter_config(module.net),
        }
    )


def _save_whole(net: nn.Module, path: Path) -> int:
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path))
    return path.stat().st_size


def _max_rel_error(a: nn.Module, b: nn.Module, size: int) -> float:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was = a.training, b.training
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    a.train(was[0]), b.train(was[1])
    return ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12)).item()


def write_artifacts(
    module: nn.Module, output_dir: str | Path, preprocessing: dict[str, Any] | None = None, merge: bool = False
) -> dict[str, Any]:
    """Write the run's artifact(s); return ``artifact``, ``artifact_bytes`` (and ``merged_*`` with merge)."""
    out = Path(output_dir)
    info = describe(module, preprocessing)
    prefixes = module.artifact_prefixes()
    result: dict[str, Any] = {}
    if prefixes is None:
        result["artifact"] = "model.safetensors"
        result["artifact_bytes"] = _save_whole(module.net, out / "model.safetensors")
        (out / "model.yaml").write_text(yaml.safe_dump({**info, "merged": True}, sort_keys=False))
        return result
    result["artifact"] = "adapter.safetensors"
    result["artifact_bytes"] = save_adapter(
        module.net, out / "adapter.safetensors", extra_prefixes=prefixes, metadata={"method": info["method"]}
    )
    (out / "adapter.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    if merge:
        merged = copy.deepcopy(module.net)
        merge_adapters(merged)
        error = _max_rel_error(module.net, merged, int(info["preprocessing"].get("size", 64)))
        if error > 1e-4:
            raise RuntimeError(f"merged model differs from the adapted one (max rel. error {error:.2e})")
        result["merged_bytes"] = _save_whole(merged, out / "model.safetensors")
        result["merged_max_rel_error"] = error
        (out / "model.yaml").write_text(yaml.safe_dump({**info, "adapter": None, "merged": True}, sort_keys=False))
    return result


def load_artifact(run_dir: str | Path, prefer: str = "adapter") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained network from a run directory's artifact (no Lightning, no pickle)."""
    run_dir = Path(run_dir)
    adapter, whole = run_dir / "adapter.safetensors", run_dir / "model.safetensors"
    use_adapter = adapter.is_file() and (prefer == "adapter" or not whole.is_file())
    meta_path = run_dir / ("adapter.yaml" if use_adapter else "model.yaml")
    info = yaml.safe_load(meta_path.read_text())
    base = info["base_model"]
    backbone = build_backbone(
        base["source"], base["name"], info["num_classes"],
        pretrained=bool(base.get("pretrained")) and use_adapter,
        weights=base.get("weights") if use_adapter else None,
        checkpoint=base.get("checkpoint") if use_adapter else None,
    )
    net = backbone.net
    if use_adapter:
        load_adapter(net, str(adapter))
    else:
        net.load_state_dict(read_state_dict(whole))
    return net.eval(), info
