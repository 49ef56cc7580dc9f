r"""Parameter-efficient adapters for pretrained image classifiers (LoRA family and SSF).

Adapters are added *in place* and keep the adapted layer's ``weight``/``bias`` at the same module path, so
a plain pretrained state dict loads into an adapted model without any key remapping::

    from ftlab.adapters import apply_lora, apply_ssf, mark_trainable, merge_adapters, save_adapter, load_adapter

    apply_lora(model, r".*\.attn\.qkv", rank=8, alpha=16, qkv="q,v")  # regexes full-match module names
    apply_lora(model, [r".*\.mlp\.fc\d"], rank=8, dora=True)          # DoRA magnitudes on top of LoRA
    apply_ssf(model, r"blocks\.\d+\.norm\d")                         # per-channel scale & shift
    mark_trainable(model, extra=["head"])        # freeze all but adapters + head; returns #elements
    save_adapter(model, "adapter.safetensors", extra_prefixes=["head"])
    load_adapter(fresh_pretrained_model, "adapter.safetensors")  # re-applies adapters, loads tensors
    merge_adapters(model)                        # back to plain layers (same classes, same keys)

- ``apply_lora(model, targets, rank=8, alpha=16.0, dropout=0.0, init="kaiming"|"gaussian"|"pissa",
  rslora=False, dora=False, qkv=None) -> list[str]``: LoRA on matched ``nn.Linear``/``nn.Conv2d``
  (subclasses such as timm ``Conv2dSame`` included; grouped/depthwise convs are refused). Scale is
  alpha/rank (alpha/sqrt(rank) with ``rslora``). Keys follow HF peft: ``<m>.lora_A.weight``,
  ``<m>.lora_B.weight``, ``<m>.lora_magnitude_vector`` (DoRA). ``qkv`` adapts only the chosen slices of a
  fused timm-ViT ``qkv`` Linear (keys ``<m>.lora_A.q.weight``; no peft equivalent). ``pissa`` initialises
  A/B from the top-r SVD of W and leaves the residual in the frozen ``weight``.
- ``apply_ssf(model, targets) -> list[str]``: per-channel scale ``ssf_scale`` (1) and shift ``ssf_shift``
  (0) after a Linear/Conv2d or folded into a BatchNorm/LayerNorm/GroupNorm affine (before the built-in
  activation of timm's ``BatchNormAct2d``).
- ``merge_adapters(model) -> list[str]``: fold every adapter into its base layer; class and keys return
  to the plain model's (SSF on a bias-less layer adds a ``bias``).
- ``adapter_params(model) -> dict[str, Parameter]``, ``mark_trainable(model, extra=()) -> int``.
- ``adapter_state_dict(model, extra_prefixes=())`` (``adapter_state_keys``: its keys, no copies),
  ``adapter_config(model)``,
  ``save_adapter(model, path, extra_prefixes=(), metadata=None) -> int`` (bytes),
  ``load_adapter(model, path_or_state_dict, strict=True, config=None) -> list[str]`` (safetensors only;
  PiSSA files also carry the residual base weights), ``peft_to_ftlab_keys`` / ``ftlab_to_peft_keys``
  (``prefix=`` maps a sub-module, e.g. ``"encoder."`` for a peft adapter on a bare transformers encoder).
- ``load_peft_adapter(model, folder, prefix="")`` / ``save_peft_adapter(model, folder, prefix="")``: HF peft
  adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), LoRA and DoRA.

Adapted modules survive ``copy.deepcopy`` and pickling, and behave like their base under ``train()``/
``eval()`` (only LoRA dropout differs). Adapters are trained through x → A → B; the frozen base weight
never receives a dense gradient.
"""

from ftlab.adapters.common import AdapterLayer, adapter_params, mark_trainable
from ftlab.adapters.lora import LoRALayer, apply_lora
from ftlab.adapters.merge import merge_adapters
from ftlab.adapters.ssf import SSFLayer, SSFNorm, apply_ssf
from ftlab.adapters.state import (
    CONFIG_KEY,
    adapter_config,
    adapter_state_dict,
    adapter_state_keys,
    apply_adapter_config,
    ftlab_to_peft_keys,
    load_adapter,
    load_peft_adapter,
    peft_to_ftlab_keys,
    read_adapter_file,
    save_adapter,
    save_peft_adapter,
)

__all__ = [
    "CONFIG_KEY",
    "AdapterLayer",
    "LoRALayer",
    "SSFLayer",
    "SSFNorm",
    "adapter_config",
    "adapter_params",
    "adapter_state_dict",
    "adapter_state_keys",
    "apply_adapter_config",
    "apply_lora",
    "apply_ssf",
    "ftlab_to_peft_keys",
    "load_adapter",
    "load_peft_adapter",
    "mark_trainable",
    "merge_adapters",
    "peft_to_ftlab_keys",
    "read_adapter_file",
    "save_adapter",
    "save_peft_adapter",
]
