"""Deployable outputs of a run: a small adapter file, or the whole (optionally merged) model.

``adapter.safetensors`` holds the adapter tensors, the head, every other trained tensor and re-estimated
BatchNorm statistics; ``adapter.yaml`` says how to rebuild the base model and re-apply it. Full
fine-tuning (and gradual unfreezing, which ends fully trained) writes ``model.safetensors`` + ``model.yaml``.
``merge=true`` additionally folds adapters into plain layers and writes ``model.safetensors``.

The yaml's ``preprocessing`` is the image size/mean/std, or for text models ``{"modality": "text",
"tokenizer": <model.name or its resolved folder>, "max_length": n}``. Tokenizer files are not copied into
the run: the tokenizer resolves wherever the base model itself does (the built-in ``minilm`` package, the
local model folder, the hub cache), and an adapter needs those base weights (a ``model.safetensors`` its
``config.json``) anyway. ``ftlab export`` writes the tokenizer beside an exported text model.
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
# Architecture keys some sources take besides BASE_KEYS (source hf: the pooling the head reads; the
# encoder's dropout). Recorded in ``base_model`` when set, so the network is rebuilt exactly.
MODEL_KEYS = ("pooling", "encoder_dropout")


def base_rebuildable(base: dict[str, Any]) -> bool:
    """Whether the frozen base weights can be re-created from ``base`` (model keys or a ``base_model`` record):
    pretrained weights from their source, or a local weights file; a random initialisation is in no file."""
    if base.get("checkpoint"):
        return True
    if not base.get("pretrained"):
        return False
    return base.get("source") != "torchvision" or bool(base.get("weights"))


def rebuild_backbone(
    base: dict[str, Any], num_classes: int, pretrained: bool = False, weights: str | None = None,
    checkpoint: str | None = None,
) -> Any:
    """The :class:`ftlab.models.Backbone` an artifact's ``base_model`` record describes."""
    extra = {k: base[k] for k in MODEL_KEYS if base.get(k) is not None}
    return build_backbone(base["source"], base["name"], num_classes, pretrained, weights, checkpoint, **extra)


def example_input(net: nn.Module, preprocessing: dict[str, Any] | None, batch: int = 2) -> Any:
    """A seeded batch the network takes: its own ``example_input()`` (text models), else images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if callable(getattr(net, "example_input", None)):
            return net.example_input(batch)
        size = int((preprocessing or {}).get("size", 64))
        return torch.randn(batch, 3, size, size)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(module: nn.Module, preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """Everything needed to rebuild the model without the original config: base, classes, preprocessing."""
    hp = dict(module.hparams)
    model_keys = {k: hp[k] for k in MODEL_KEYS if hp.get(k) is not None}
    method_keys = {k: v for k, v in hp.items()
                   if k not in (*BASE_KEYS, *MODEL_KEYS, "num_classes", "class_names")}
    return _plain(
        {
            "method": module.method,
            "target": f"{type(module).__module__}.{type(module).__qualname__}",
            "base_model": {**{k: hp.get(k) for k in BASE_KEYS}, **model_keys, "weight_source": module.weight_source},
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


def _max_rel_error(a: nn.Module, b: nn.Module, preprocessing: dict[str, Any] | None) -> float:
    x = example_input(a, preprocessing)
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
        error = _max_rel_error(module.net, merged, info["preprocessing"])
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
    backbone = rebuild_backbone(
        base, info["num_classes"],
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
