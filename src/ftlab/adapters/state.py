"""Saving and loading adapters: small safetensors files that re-create themselves on a fresh base model.

File layout: tensors = ``adapter_state_dict`` (adapter parameters, PiSSA residual base weights, and every
tensor under the caller's ``extra_prefixes``); safetensors metadata ``"ftlab_adapter"`` = JSON of
``adapter_config`` (+ ``extra_prefixes``), plus any user metadata as strings. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ftlab.adapters.common import (
    _join,
    adapter_layers,
    check_prefixes_exist,
    find_targets,
    normalise_prefixes,
    under_prefix,
)
from ftlab.adapters.lora import LoRALayer, add_lora, check_lora_targets, make_lora_config
from ftlab.adapters.ssf import SSF_TYPES, add_ssf, check_ssf_targets

CONFIG_KEY = "ftlab_adapter"
FORMAT = "ftlab.adapters"
VERSION = 1
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, extra_prefixes: str | Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Adapter tensors by full name, detached, contiguous cpu copies.

    Includes the base ``weight`` of PiSSA layers (it holds the residual W − s·B·A, not the pretrained
    weight) and every parameter/buffer under ``extra_prefixes`` (module paths, e.g. the classifier head,
    or BatchNorm layers whose running statistics were re-estimated).
    """
    full = model.state_dict()
    keys = adapter_state_keys(model, extra_prefixes, full)
    # Copies, so the result neither aliases live parameters nor shares storage (safetensors refuses that).
    return {k: full[k].detach().to("cpu", copy=True).contiguous() for k in keys}


def adapter_state_keys(
    model: nn.Module, extra_prefixes: str | Iterable[str] = (), state: Mapping[str, Any] | None = None
) -> list[str]:
    """The state-dict keys :func:`adapter_state_dict` holds, in order, without copying any tensor.

    ``state``: ``model.state_dict()`` when the caller already has it.
    """
    prefixes = normalise_prefixes(extra_prefixes)
    full = model.state_dict() if state is None else state
    check_prefixes_exist(full, prefixes, "adapter_state_dict")
    keys = [_join(name, rel) for name, layer in adapter_layers(model) for rel in layer.adapter_state_keys()]
    keys += [k for k in full if any(under_prefix(k, p) for p in prefixes)]
    return list(dict.fromkeys(keys))


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """JSON-able description that re-creates the model's adapters on a fresh base.

    ``{"format": "ftlab.adapters", "version": 1,
       "lora": [{"modules": [...], "rank": 8, "alpha": 16.0, "dropout": 0.0, "init": "kaiming",
                 "rslora": false, "dora": false, "qkv": null | ["q", "v"]}, ...],
       "ssf": {"modules": [...]}}``
    LoRA layers sharing identical hyper-parameters form one group.
    """
    lora_groups: dict[str, dict[str, Any]] = {}
    ssf_modules: list[str] = []
    for name, layer in adapter_layers(model):
        if isinstance(layer, LoRALayer):
            hparams = layer.adapter_hparams()
            group = lora_groups.setdefault(json.dumps(hparams, sort_keys=True), {"modules": [], **hparams})
            group["modules"].append(name)
        else:
            ssf_modules.append(name)
    return {
        "format": FORMAT,
        "version": VERSION,
        "lora": list(lora_groups.values()),
        "ssf": {"modules": ssf_modules},
    }


def _resolve(
    model: nn.Module, names: list[str], supported: tuple[type, ...], method: str
) -> list[tuple[str, nn.Module]]:
    matched = find_targets(model, [re.escape(n) for n in names], supported, method)
    absent = sorted(set(names) - {n for n, _ in matched})
    if absent:
        raise ValueError(f"{method}: the adapter config names modules this model lacks: {absent[:10]}")
    return matched


def apply_adapter_config(model: nn.Module, config: Mapping[str, Any]) -> list[str]:
    """Add the adapters described by ``config`` (from ``adapter_config``) with placeholder (zero) values.

    Modules that already carry the identical adapter are left alone, so loading into a model that was
    adapted by hand works too. Returns the sorted names of all modules the config covers.
    """
    if config.get("format", FORMAT) != FORMAT or int(config.get("version", VERSION)) > VERSION:
        raise ValueError(
            f"unsupported adapter config format/version: {config.get('format')}/{config.get('version')}"
        )
    existing = dict(adapter_layers(model))
    covered: list[str] = []
    for group in config.get("lora", []):
        hparams = make_lora_config(
            group["rank"],
            group["alpha"],
            group.get("dropout", 0.0),
            group.get("init", "kaiming"),
            group.get("rslora", False),
            group.get("dora", False),
            group.get("qkv"),
        )
        todo = []
        for name in group["modules"]:
            layer = existing.get(name)
            if layer is None:
                todo.append(name)
            elif not isinstance(layer, LoRALayer) or layer.adapter_hparams() != hparams:
                raise ValueError(
                    f"load_adapter: {name} already carries a different adapter ({type(layer).__name__})"
                )
        if todo:
            matched = _resolve(model, todo, (nn.Linear, nn.Conv2d), "load_adapter")
            check_lora_targets(matched, hparams)
            for _, module in matched:
                add_lora(module, hparams, initialise=False)
        covered += group["modules"]
    ssf_names = list(config.get("ssf", {}).get("modules", []))
    todo = []
    for name in ssf_names:
        layer = existing.get(name)
        if layer is None:
            todo.append(name)
        elif layer.method != "ssf":
            raise ValueError(
                f"load_adapter: {name} already carries a different adapter ({type(layer).__name__})"
            )
    if todo:
        matched = _resolve(model, todo, SSF_TYPES, "load_adapter")
        check_ssf_targets(matched)
        fallback = next(iter(model.parameters()), None)
        for _, module in matched:
            add_ssf(module, fallback)
    covered += ssf_names
    return sorted(covered)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    extra_prefixes: str | Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Write ``adapter_state_dict`` + config to a ``.safetensors`` file; returns its size in bytes.

    Non-string metadata values are stored as JSON (falling back to ``str``), since safetensors metadata
    is a string-to-string map.
    """
    state = adapter_state_dict(model, extra_prefixes)
    if not state:
        raise ValueError("save_adapter: the model has no adapters and no extra_prefixes were given")
    config = adapter_config(model)
    config["extra_prefixes"] = normalise_prefixes(extra_prefixes)
    header = {CONFIG_KEY: json.dumps(config)}
    for key, value in (metadata or {}).items():
        if key == CONFIG_KEY:
            raise ValueError(f"metadata key {CONFIG_KEY!r} is reserved")
        header[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=header)
    return path.stat().st_size


def read_adapter_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, str]]:
    """(tensors, adapter config or None, remaining user metadata) of a safetensors adapter file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file (pickled checkpoints are refused): {err}"
        ) from err
    raw = metadata.pop(CONFIG_KEY, None)
    return tensors, (json.loads(raw) if raw is not None else None), metadata


def load_adapter(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    strict: bool = True,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Re-create the adapters (unless already present) and load their tensors; returns adapted module names.

    ``path_or_state_dict``: a file written by ``save_adapter`` (its config is used unless ``config`` is
    given), or a state dict plus ``config``. Keys in HF-peft form (``base_model.model.…``) are converted
    with ``peft_to_ftlab_keys``. ``strict``: every adapter tensor of the model must be present and every
    given key must exist in the model.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state, file_config, _ = read_adapter_file(path_or_state_dict)
        config = config if config is not None else file_config
    else:
        state = dict(path_or_state_dict)
    if any(k.startswith(PEFT_PREFIX) for k in state):
        state = peft_to_ftlab_keys(state)
    if config is not None:
        apply_adapter_config(model, config)
    layers = adapter_layers(model)
    if not layers and config is None:
        raise ValueError("load_adapter: the model has no adapters and no config was given; pass config=...")
    expected = {_join(name, rel) for name, layer in layers for rel in layer.adapter_state_keys()}
    model_keys = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - model_keys)
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_adapter: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in model_keys}, strict=False)
    return sorted(name for name, _ in layers)


def _prefix(prefix: str) -> str:
    """``"encoder"`` / ``"encoder."`` -> ``"encoder."``; ``""`` stays empty."""
    prefix = str(prefix or "")
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def peft_to_ftlab_keys(
    state_dict: Mapping[str, Any], adapter_name: str = "default", prefix: str = ""
) -> dict[str, Any]:
    """Rename HF-peft LoRA keys to ftlab keys (values untouched).

    Handles both peft's saved form (``base_model.model.<m>.lora_A.weight``, ``<m>.lora_magnitude_vector``)
    and its in-memory form (``<m>.lora_A.default.weight``, ``<m>.lora_magnitude_vector.default.weight``,
    ``<m>.base_layer.weight``, ``<m>.modules_to_save.default.<p>``). peft's frozen duplicate of a
    modules_to_save layer (``<m>.original_module.<p>``) is dropped, the only non-rename.

    ``prefix``: the module path, inside the ftlab network, of the model peft wrapped; it is put in front of
    every key. A peft adapter made on a bare transformers encoder (``AutoModel``, e.g. ``BertModel``) loads
    into :class:`ftlab.models.hf.HFTextClassifier` with ``prefix="encoder."`` (peft's
    ``base_model.model.encoder.layer.0…`` becomes ftlab's ``encoder.encoder.layer.0…``).
    """
    prefix = _prefix(prefix)
    name = re.escape(adapter_name)
    rules = [
        (re.compile(rf"\.(lora_A|lora_B)\.{name}\."), r".\1."),
        (re.compile(rf"\.lora_magnitude_vector\.{name}(\.weight)?$"), ".lora_magnitude_vector"),
        (re.compile(rf"\.modules_to_save\.{name}\."), "."),
        (re.compile(r"\.base_layer\."), "."),
    ]
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if re.search(r"(^|\.)original_module\.", new):
            continue
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        new = prefix + new
        if new in out:
            raise ValueError(f"peft_to_ftlab_keys: two keys map to {new!r}")
        out[new] = value
    return out


def ftlab_to_peft_keys(
    state_dict: Mapping[str, Any], adapter_name: str | None = None, prefix: str = ""
) -> dict[str, Any]:
    """Rename ftlab keys to HF-peft keys (values untouched); inverse of ``peft_to_ftlab_keys``.

    ``adapter_name=None`` gives peft's saved-file form (``base_model.model.<m>.lora_A.weight``); a name
    gives its in-memory form (``…lora_A.<name>.weight``). Keys of qkv slices (``lora_A.q.weight``) and SSF
    have no peft equivalent and are only prefixed; a PiSSA residual ``<m>.weight`` is a base weight to peft.

    ``prefix``: the module path, inside the ftlab network, of the model peft will wrap; it is taken off
    every key, and keys outside it are left out (they are not part of that model: e.g. ftlab's classifier
    ``head.*`` when peft wraps the bare encoder, ``prefix="encoder."``).
    """
    prefix = _prefix(prefix)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if prefix and not key.startswith(prefix):
            continue
        new = key[len(prefix):]
        if adapter_name is not None:
            new = re.sub(r"\.(lora_A|lora_B)\.", rf".\1.{adapter_name}.", new)
            new = re.sub(r"\.lora_magnitude_vector$", f".lora_magnitude_vector.{adapter_name}.weight", new)
        out[PEFT_PREFIX + new] = value
    return out


# -- HF peft adapter folders -----------------------------------------------------------------------
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def load_peft_adapter(
    model: nn.Module, path: str | os.PathLike[str], prefix: str = "", strict: bool = True
) -> list[str]:
    """Apply a HF peft LoRA/DoRA adapter folder (peft's ``save_pretrained``: ``adapter_config.json`` +
    ``adapter_model.safetensors``) to ``model``; returns the adapted module names.

    LoRA goes on exactly the modules the file holds tensors for, with peft's ``r``, ``lora_alpha``,
    ``lora_dropout``, ``use_rslora`` and ``use_dora`` (the same scaling and DoRA formula as ftlab's).
    ``prefix`` as in :func:`peft_to_ftlab_keys` (``"encoder."`` for an adapter made on a bare transformers
    encoder, loaded into :class:`ftlab.models.hf.HFTextClassifier`). Per-module ranks (``rank_pattern``,
    ``alpha_pattern``), LoRA biases and Conv1D (``fan_in_fan_out``) models are refused with a ValueError.
    """
    folder = Path(path)
    config_path, weights_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"load_peft_adapter: {folder} needs {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}")
    peft_config = json.loads(config_path.read_text())
    if str(peft_config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"load_peft_adapter: {folder} is a {peft_config.get('peft_type')} adapter, not LoRA")
    for key in ("rank_pattern", "alpha_pattern", "lora_bias", "fan_in_fan_out", "layer_replication"):
        if peft_config.get(key):
            raise ValueError(f"load_peft_adapter: {folder}: peft's {key} has no ftlab equivalent")
    state, _, _ = read_adapter_file(weights_path)
    state = peft_to_ftlab_keys(state, prefix=prefix)
    modules = sorted({k.rpartition(".lora_A.")[0] for k in state if ".lora_A." in k})
    if not modules:
        raise ValueError(f"load_peft_adapter: {weights_path} holds no lora_A tensors")
    hparams = make_lora_config(
        int(peft_config["r"]), float(peft_config["lora_alpha"]), float(peft_config.get("lora_dropout") or 0.0),
        "kaiming", bool(peft_config.get("use_rslora")), bool(peft_config.get("use_dora")), None,
    )
    config = {"format": FORMAT, "version": VERSION, "lora": [{"modules": modules, **hparams}], "ssf": {"modules": []}}
    return load_adapter(model, state, strict=strict, config=config)


def save_peft_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    prefix: str = "",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``model``'s LoRA/DoRA adapters as a HF peft adapter folder that ``PeftModel.from_pretrained``
    loads onto the model at ``prefix`` (``"encoder."`` for the transformers encoder of an
    :class:`ftlab.models.hf.HFTextClassifier`); returns the folder.

    Only the adapter tensors are written: ftlab's new classifier head (and anything else outside ``prefix``)
    is not part of the model peft wraps. One rank/alpha for all layers; SSF, PiSSA and qkv-sliced LoRA have
    no peft form and are refused with a ValueError.
    """
    prefix = _prefix(prefix)
    config = adapter_config(model)
    if config["ssf"]["modules"]:
        raise ValueError("save_peft_adapter: SSF adapters have no peft equivalent")
    if len(config["lora"]) != 1:
        raise ValueError(f"save_peft_adapter: expected one LoRA configuration, found {len(config['lora'])}")
    group = config["lora"][0]
    if group["qkv"] is not None or group["init"] == "pissa":
        raise ValueError("save_peft_adapter: qkv-sliced and PiSSA LoRA have no peft adapter-file form")
    outside = [m for m in group["modules"] if not m.startswith(prefix)]
    if outside:
        raise ValueError(f"save_peft_adapter: adapted modules outside prefix {prefix!r}: {outside[:5]}")
    state = ftlab_to_peft_keys(adapter_state_dict(model), prefix=prefix)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": group["rank"],
        "lora_alpha": group["alpha"],
        "lora_dropout": group["dropout"],
        "use_rslora": group["rslora"],
        "use_dora": group["dora"],
        "target_modules": [m[len(prefix):] for m in group["modules"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return folder
