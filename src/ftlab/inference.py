"""Rebuild a trained classifier for inference from whatever a run left behind; eval, predict and export all
start here, so class names and preprocessing always travel with the weights.

``load_predictor(source)`` accepts:

- a run directory: ``model.safetensors`` (full fine-tuning, or a merged adapter run), else
  ``adapter.safetensors`` when its base model can be rebuilt, else ``checkpoints/best.ckpt`` (``last.ckpt``);
- an artifact file, ``adapter.safetensors`` or ``model.safetensors``, with its ``.yaml`` beside it
  (base model + adapter: the base is rebuilt from the yaml, the adapter applied on top);
- a Lightning checkpoint, read with ``torch.load(weights_only=True)``: the module class comes from the run's
  ``.hydra/config.yaml`` when the file sits in ``<run>/checkpoints/``, else from the ``ftlab`` entry that
  :meth:`ftlab.module.ClassifierModule.on_save_checkpoint` writes into every checkpoint. A PEFT checkpoint
  (``ftlab_base`` entry, :mod:`ftlab.base_weights`) gets its frozen base rebuilt and checked by sha256.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from ftlab.adapters import CONFIG_KEY, load_adapter
from ftlab.artifacts import base_rebuildable, rebuild_backbone
from ftlab.base_weights import BASE_KEY
from ftlab.data.images import readable_image_loader
from ftlab.data.transforms import eval_transform
from ftlab.data.workers import inference_workers
from ftlab.errors import UserError
from ftlab.models.weights import read_state_dict
from ftlab.runs import find_run_dir, run_config

log = logging.getLogger(__name__)

BASE_KEYS = ("source", "name", "pretrained", "weights", "checkpoint")
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")


# -- plain state dicts ---------------------------------------------------------------------------
def load_plain_state(net: nn.Module, state: dict[str, torch.Tensor], origin: str | Path) -> None:
    """Load a whole-model state dict strictly into a freshly built network.

    Merging SSF into a layer without bias (or a norm without affine) created that tensor, so the fresh
    layer gets the parameter too before loading.
    """
    own = net.state_dict()
    for key in state.keys() - own.keys():
        module_name, _, attr = key.rpartition(".")
        try:
            module = net.get_submodule(module_name) if module_name else net
        except AttributeError:
            continue
        if attr in ("weight", "bias") and getattr(module, attr, None) is None:
            module.register_parameter(attr, nn.Parameter(torch.empty_like(state[key])))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[:2])[:300]
        raise UserError(f"{origin}: does not fit the model it describes ({detail})") from None


# -- sources -------------------------------------------------------------------------------------
def _info(kind: str, path: Path, meta: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    pre = dict(meta["preprocessing"])
    return {
        "kind": kind,
        "path": str(path),
        "run_dir": str(run_dir) if run_dir else None,
        "method": meta.get("method"),
        "target": meta.get("target"),
        "base_model": dict(meta.get("base_model") or {}),
        "head": meta.get("head"),
        "num_classes": int(meta["num_classes"]),
        "class_names": [str(c) for c in meta["class_names"]],
        "preprocessing": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in pre.items()},
    }


def _is_adapter_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except Exception as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def _from_artifact(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    meta_path = path.with_suffix(".yaml")
    if not meta_path.is_file():
        raise UserError(f"{path}: needs {meta_path.name} beside it (base model, class names, preprocessing)")
    meta = yaml.safe_load(meta_path.read_text())
    base = meta["base_model"]
    run_dir = find_run_dir(path)
    if _is_adapter_file(path):
        if not base_rebuildable(base):
            hint = f"; use {run_dir / 'checkpoints' / 'best.ckpt'}" if run_dir else "; use its checkpoint"
            raise UserError(
                f"{path}: the adapter's base model was randomly initialised (pretrained=false), "
                f"so its frozen weights are in no file{hint}"
            )
        net = rebuild_backbone(base, meta["num_classes"], bool(base.get("pretrained")), base.get("weights"),
                               base.get("checkpoint")).net
        try:
            load_adapter(net, str(path))
        except ValueError as exc:
            raise UserError(f"{path}: does not fit its base model {base['name']} ({exc})") from None
        return net.eval(), _info("adapter", path, meta, run_dir)
    net = rebuild_backbone(base, meta["num_classes"], pretrained=False).net
    load_plain_state(net, read_state_dict(path), path)
    return net.eval(), _info("model", path, meta, run_dir)


def _module_class(target: str, origin: Path) -> type:
    # Lazy: Lightning (which the module imports) is only needed for checkpoints.
    from ftlab.module import ClassifierModule

    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"{origin}: trained with {target}, which this installation does not have") from None
    if not (isinstance(cls, type) and issubclass(cls, ClassifierModule)):
        raise UserError(f"{origin}: {target} is not an ftlab method class")
    return cls


def _preprocessing_from_config(cfg: DictConfig | None, data_config: dict[str, Any]) -> dict[str, Any]:
    # The same overrides the datamodule applies in set_preprocessing().
    pre = dict(data_config)
    if cfg is not None and is_text(pre):
        max_length = OmegaConf.select(cfg, "data.max_length", default=None)
        if max_length:
            pre["max_length"] = int(max_length)
    elif cfg is not None:
        size = OmegaConf.select(cfg, "data.image_size", default=None)
        crop = OmegaConf.select(cfg, "data.crop_pct", default=None)
        if size:
            pre["size"] = int(size)
        if crop:
            pre["crop_pct"] = float(crop)
    return pre


def _from_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: refused to load (only tensors and plain values are accepted: {first})") \
            from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path}: not a Lightning checkpoint of an ftlab run (no state_dict or hparams)")
    run_dir = find_run_dir(path)
    cfg = run_config(run_dir) if run_dir else None
    saved = ckpt.get("ftlab") or {}
    target = OmegaConf.select(cfg, "model._target_") if cfg is not None else None
    if not target:
        target = saved.get("target")
        # A lone file names its own class: import nothing outside ftlab on its word.
        if not (isinstance(target, str) and target.startswith("ftlab.")):
            raise UserError(
                f"{path}: cannot tell which ftlab method trained it; keep it in its run's checkpoints/ "
                "folder (beside .hydra/config.yaml)"
            )
    cls = _module_class(str(target), path)
    hp = dict(ckpt["hyper_parameters"])
    if BASE_KEY in ckpt:
        # A PEFT checkpoint holds what trained: the frozen base is built from its source, as in training.
        try:
            module = cls(**hp)
        except UserError as exc:
            raise UserError(f"{path}: holds only the trained tensors and its base cannot be built ({exc})") from None
        module.restore_base(ckpt, str(path))
    else:
        # Every tensor is in the state dict: build without pretrained weights (no download, no base file).
        module = cls(**{**hp, "pretrained": False, "checkpoint": None})
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]
        raise UserError(f"{path}: state dict does not fit {target} ({detail})") from None
    pre = saved.get("preprocessing")
    if not pre and run_dir is not None:
        for name in ("adapter.yaml", "model.yaml"):
            if (run_dir / name).is_file():
                pre = yaml.safe_load((run_dir / name).read_text()).get("preprocessing")
                break
    meta = {
        "method": cls.method,
        "target": str(target),
        "base_model": {k: hp.get(k) for k in BASE_KEYS},
        "head": module.head_name,
        "num_classes": hp["num_classes"],
        "class_names": list(module.class_names),
        "preprocessing": pre or _preprocessing_from_config(cfg, module.data_config),
    }
    return module.net.eval(), _info("checkpoint", path, meta, run_dir)


def _from_run_dir(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    whole, adapter = run_dir / "model.safetensors", run_dir / "adapter.safetensors"
    if whole.is_file():
        return _from_artifact(whole)
    if adapter.is_file() and adapter.with_suffix(".yaml").is_file():
        base = yaml.safe_load(adapter.with_suffix(".yaml").read_text()).get("base_model") or {}
        if base_rebuildable(base):
            try:
                return _from_artifact(adapter)
            except UserError as exc:
                # e.g. hub weights that cannot be fetched offline: the checkpoint holds every tensor.
                if not any((run_dir / "checkpoints" / n).is_file() for n in CHECKPOINT_NAMES):
                    raise
                log.warning("%s; using the run's checkpoint instead", exc)
    for name in CHECKPOINT_NAMES:
        if (run_dir / "checkpoints" / name).is_file():
            return _from_checkpoint(run_dir / "checkpoints" / name)
    if adapter.is_file():
        return _from_artifact(adapter)
    raise UserError(f"{run_dir}: not a run directory (no model/adapter.safetensors, no checkpoints/)")


def load_predictor(source: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network (cpu, fp32, eval mode, adapters unmerged) and what it needs at inference.

    ``info``: kind (model|adapter|checkpoint), path, run_dir, method, target, base_model, head,
    num_classes, class_names, preprocessing (size, mean, std, interpolation, crop_pct; for text models
    modality "text", tokenizer, max_length: see :func:`is_text`).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source}: no such run directory, checkpoint or artifact")
    if path.is_dir():
        net, info = _from_run_dir(path)
    elif path.suffix == ".ckpt":
        net, info = _from_checkpoint(path)
    elif path.suffix == ".safetensors":
        net, info = _from_artifact(path)
    else:
        raise UserError(f"{path}: expected a run directory, a .ckpt checkpoint or a .safetensors artifact")
    return net.float(), info


def is_text(preprocessing: dict[str, Any] | None) -> bool:
    """Whether a model's preprocessing is a tokenizer (text model) rather than an image transform."""
    return (preprocessing or {}).get("modality") == "text"


def describe_source(info: dict[str, Any]) -> str:
    method = f"{info['method']} " if info.get("method") else ""
    model = info["base_model"].get("name")
    return f"{info['path']} ({info['kind']}, {method}{model}, {info['num_classes']} classes)"


# -- running batches -----------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA device is available")
    return device


def with_progress(batches: Iterable[Any], total: int, description: str) -> Iterator[Any]:
    """Yield ``batches`` under a progress bar on stderr (rich; plain when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    # Logs and pipes get no bar: it would only leave control characters and blank lines behind.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        for batch in batches:
            yield batch
            progress.advance(task)


# -- reading images that may be broken -----------------------------------------------------------
def image_loader(
    paths: list[str], preprocessing: dict[str, Any], batch_size: int, num_workers: int | str,
    device: torch.device | None = None,
) -> DataLoader:
    """Batches of (good images or None, their indices, [(index, error)]) in the model's eval preprocessing.
    ``device``: where the network runs; on the CPU ``num_workers=auto`` leaves torch's threads their cores
    (:func:`ftlab.data.workers.inference_workers`)."""
    workers = inference_workers(num_workers, on_cpu=device is not None and device.type == "cpu")
    return readable_image_loader(paths, eval_transform(preprocessing), batch_size, workers)


def warn_unreadable(bad: list[tuple[str, str]], what: str = "file(s)") -> None:
    """One warning on stderr naming every skipped file (or text: ``what="text(s)"``)."""
    if bad:
        listed = "; ".join(f"{path} ({(err.splitlines() or [''])[0][:120]})" for path, err in bad)
        print(f"ftlab: warning: skipped {len(bad)} unreadable {what}: {listed}", file=sys.stderr)
