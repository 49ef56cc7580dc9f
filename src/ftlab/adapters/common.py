"""Machinery shared by every adapter: class swapping, target matching and freezing.

An adapted layer is the *same* module object whose ``__class__`` was swapped to a cached subclass of its
own class (``LoRA[Conv2dSame]``, ``SSF[BatchNormAct2d]``). The base ``weight``/``bias`` therefore keep
their names and module path, so a base-model state dict loads into an adapted model without remapping,
and any subclass-specific ``forward`` (TF "same" padding, fused activation) keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

# Mixins by name, so a pickled adapted module can rebuild its dynamic class in a fresh process.
_MIXINS: dict[str, type] = {}
_CLASS_CACHE: dict[tuple[type, type], type] = {}


class AdapterLayer:
    """Mixin for adapted layers; concrete mixins answer which of their parameters are adapter parameters."""

    display_name: ClassVar[str] = "Adapter"
    method: ClassVar[str] = ""
    # Every attribute an adapter may add to the instance; removing them restores the plain layer.
    extra_attributes: ClassVar[tuple[str, ...]] = ()
    _ftlab_base: ClassVar[type[nn.Module]]
    _ftlab_mixin: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_ftlab_base" not in cls.__dict__:
            _MIXINS[cls.__qualname__] = cls

    def adapter_params(self) -> list[str]:
        """Names (relative to this module) of the parameters that belong to the adapter."""
        raise NotImplementedError

    def adapter_state_keys(self) -> list[str]:
        """Names (relative to this module) of the tensors a saved adapter must contain."""
        return self.adapter_params()

    def adapter_hparams(self) -> dict[str, Any]:
        """JSON-able hyper-parameters that, with the module name, re-create this adapter."""
        return {}

    def merge_into_base(self) -> None:
        """Fold the adapter into the base parameters and turn this module back into its base class."""
        raise NotImplementedError

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The dynamic class is not importable by name; rebuild it from (mixin, base class) instead.
        cls = type(self)
        return _rebuild_adapted, (cls._ftlab_mixin, cls._ftlab_base), self.__getstate__()


def _rebuild_adapted(mixin_name: str, base: type) -> nn.Module:
    cls = adapted_class(_MIXINS[mixin_name], base)
    return cls.__new__(cls)


def adapted_class(mixin: type, base: type) -> type:
    """The cached subclass ``mixin[base]`` whose methods run before the base class's."""
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = f"{mixin.display_name}[{base.__name__}]"
        _CLASS_CACHE[key] = type(
            name,
            (mixin, base),
            {
                "_ftlab_base": base,
                "_ftlab_mixin": mixin.__qualname__,
                "__module__": mixin.__module__,
                "__qualname__": name,
            },
        )
    return _CLASS_CACHE[key]


def swap_in(module: nn.Module, mixin: type) -> None:
    module.__class__ = adapted_class(mixin, type(module))


def restore_base(module: nn.Module) -> None:
    """Delete everything the adapter added and give the module its original class back."""
    for name in type(module).extra_attributes:
        if name in module._parameters or name in module._modules or name in module._buffers:
            delattr(module, name)
        elif name in module.__dict__:
            del module.__dict__[name]
    module.__class__ = type(module)._ftlab_base


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """All adapter parameters of ``model`` by full name, as declared by each adapted layer."""
    out: dict[str, nn.Parameter] = {}
    for name, layer in adapter_layers(model):
        for rel in layer.adapter_params():
            out[_join(name, rel)] = layer.get_parameter(rel)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def normalise_prefixes(prefixes: str | Iterable[str]) -> list[str]:
    # A bare string is a single prefix, not an iterable of one-character prefixes.
    items = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    return [p.rstrip(".") for p in items]


def under_prefix(name: str, prefix: str) -> bool:
    """Module-path prefix test: ``head`` covers ``head.weight`` but not ``head_dist.weight``."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def check_prefixes_exist(names: Iterable[str], prefixes: Sequence[str], what: str) -> None:
    # A typo in the head name would otherwise silently freeze (or drop) the head.
    names = list(names)
    unknown = [p for p in prefixes if not any(under_prefix(n, p) for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"{what}: no parameter/buffer under {unknown}; top-level names are {tops[:20]}")


def mark_trainable(model: nn.Module, extra: Iterable[str] = ()) -> int:
    """Freeze everything, then unfreeze adapter parameters and every parameter under an ``extra`` prefix.

    Prefixes follow module paths (``"head"`` covers ``head.weight``, not ``head_dist.weight``).
    Returns the number of trainable elements. Only ``requires_grad`` is touched: BatchNorm running
    statistics still update in ``train()`` mode unless the caller keeps those layers in eval mode.
    """
    prefixes = normalise_prefixes(extra)
    named = dict(model.named_parameters())
    check_prefixes_exist(named, prefixes, "mark_trainable")
    wanted = set(adapter_params(model))
    for name, p in named.items():
        p.requires_grad_(name in wanted or any(under_prefix(name, pre) for pre in prefixes))
    return sum(p.numel() for p in named.values() if p.requires_grad)


def compile_targets(targets: str | Iterable[str]) -> list[re.Pattern[str]]:
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ValueError("targets is empty: give at least one regular expression")
    return [re.compile(t) for t in items]


def find_targets(
    model: nn.Module,
    targets: str | Iterable[str],
    supported: tuple[type, ...],
    method: str,
) -> list[tuple[str, nn.Module]]:
    """Modules whose full name full-matches any target regex, validated against ``supported``.

    Modules inside an adapter (``fc.lora_A``) are never candidates, so broad patterns stay safe.
    """
    patterns = compile_targets(targets)
    inside: list[str] = []
    candidates: list[str] = []
    matched: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
        if isinstance(module, supported):
            candidates.append(name)
        if any(p.fullmatch(name) for p in patterns):
            matched.append((name, module))
    if not matched:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"{method}: no module name full-matches targets {[p.pattern for p in patterns]}. "
            f"{len(candidates)} candidate modules, e.g.: {shown or '(none)'}"
        )
    already = [f"{n} ({type(m).__name__})" for n, m in matched if isinstance(m, AdapterLayer)]
    if already:
        raise ValueError(f"{method}: modules already carry an adapter (merge first): {already}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, supported)]
    if wrong:
        kinds = "/".join(t.__name__ for t in supported)
        raise ValueError(f"{method}: matched modules that are not {kinds}; narrow the targets: {wrong}")
    return matched


def reference_tensor(module: nn.Module) -> torch.Tensor | None:
    """A tensor whose dtype/device new adapter parameters should follow."""
    for t in module.parameters(recurse=False):
        return t
    for t in module.buffers(recurse=False):
        if t.is_floating_point():
            return t
    return None


def new_param(values: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    if like is not None:
        dtype = like.dtype if like.is_floating_point() else values.dtype
        values = values.to(device=like.device, dtype=dtype)
    return nn.Parameter(values)
