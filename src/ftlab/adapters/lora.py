"""LoRA (Hu et al. 2021) for ``nn.Linear`` / ``nn.Conv2d`` and their subclasses.

Variants: rsLoRA scaling (alpha/sqrt(r)), Gaussian or PiSSA initialisation, DoRA magnitudes and per-slice
LoRA on a fused timm-ViT ``qkv`` projection. Parameter names follow HF peft (``<m>.lora_A.weight`` of
shape (r, in[, kh, kw]), ``<m>.lora_B.weight`` of shape (out, r[, 1, 1]), ``<m>.lora_magnitude_vector``),
except the qkv slices (``<m>.lora_A.q.weight``), which have no peft equivalent.

Training never forms W + ΔW under autograd: the adapter path is x → A → B, so the frozen base weight gets
no dense gradient.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ftlab.adapters import dora as _dora
from ftlab.adapters.common import AdapterLayer, find_targets, restore_base, swap_in
from ftlab.adapters.pissa import pissa_init_

INITS = ("kaiming", "gaussian", "pissa")
QKV_SLICES = ("q", "k", "v")


def _weight_standardised_convs() -> tuple[type, ...]:
    # Their forward standardises the weight (non-linear in W), so W + ΔW would not merge exactly.
    try:
        from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:
        return ()
    return (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


class LoRALayer(AdapterLayer):
    """LoRA mixin; ``LoRA[Base]`` runs ``Base.forward`` and adds ``scaling · B(A(dropout(x)))``."""

    display_name = "LoRA"
    method = "lora"
    extra_attributes = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "lora_config", "scaling")

    lora_A: nn.Module
    lora_B: nn.Module
    lora_dropout: nn.Module
    lora_config: dict[str, Any]
    scaling: float

    def lora_pairs(self) -> list[tuple[slice, nn.Module, nn.Module]]:
        """(output rows, A, B) for every low-rank update; one pair covering all rows unless qkv slicing."""
        slices = self.lora_config["qkv"]
        if slices is None:
            return [(slice(None), self.lora_A, self.lora_B)]
        d = self.weight.shape[0] // 3
        return [
            (slice(QKV_SLICES.index(k) * d, (QKV_SLICES.index(k) + 1) * d), self.lora_A[k], self.lora_B[k])
            for k in slices
        ]

    def adapter_params(self) -> list[str]:
        names = [f"lora_A.{n}" for n, _ in self.lora_A.named_parameters()]
        names += [f"lora_B.{n}" for n, _ in self.lora_B.named_parameters()]
        if self.lora_config["dora"]:
            names.append("lora_magnitude_vector")
        return names

    def adapter_state_keys(self) -> list[str]:
        keys = self.adapter_params()
        if self.lora_config["init"] == "pissa":
            keys.append("weight")
        return keys

    def adapter_hparams(self) -> dict[str, Any]:
        return copy.deepcopy(self.lora_config)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s·B·A in the base weight's shape; only for merging and DoRA norms, never under autograd."""
        weight = self.weight
        dtype = dtype or weight.dtype
        pairs = self.lora_pairs()
        if self.lora_config["qkv"] is None:
            _, a, b = pairs[0]
            delta = b.weight.flatten(1).to(dtype) @ a.weight.flatten(1).to(dtype)
        else:
            delta = torch.zeros(weight.shape[0], weight[0].numel(), dtype=dtype, device=weight.device)
            for rows, a, b in pairs:
                delta[rows] = b.weight.flatten(1).to(dtype) @ a.weight.flatten(1).to(dtype)
        return (delta * self.scaling).view(weight.shape)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x)
        # Scaling the rank-r tensor, not B's full-width output: the same product, r/out of the work.
        if self.lora_config["qkv"] is None:
            return self.lora_B(self.lora_A(h) * self.scaling)
        parts = {k: self.lora_B[k](self.lora_A[k](h) * self.scaling) for k in self.lora_config["qkv"]}
        ref = next(iter(parts.values()))
        return torch.cat([parts[k] if k in parts else torch.zeros_like(ref) for k in QKV_SLICES], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        delta = self.lora_output(x)
        if self.lora_config["dora"]:
            return _dora.dora_output(self, out, delta, channel_dim=1 if isinstance(self, nn.Conv2d) else -1)
        return out + delta

    def merge_into_base(self) -> None:
        weight = self.weight
        with torch.no_grad():
            merged = weight.float() + self.delta_weight(torch.float32)
            if self.lora_config["dora"]:
                merged = _dora.rescale_weight(merged, self.lora_magnitude_vector.float())
            weight.copy_(merged.to(weight.dtype))
        restore_base(self)

    def extra_repr(self) -> str:
        c = self.lora_config
        extras = f"lora: r={c['rank']}, alpha={c['alpha']}, init={c['init']}"
        extras += ", rslora" * c["rslora"] + ", dora" * c["dora"]
        if c["qkv"] is not None:
            extras += f", qkv={','.join(c['qkv'])}"
        return f"{super().extra_repr()}, {extras}"


def parse_qkv(qkv: str | Iterable[str] | None) -> list[str] | None:
    """``"q,v"`` / ``("q", "v")`` → ``["q", "v"]`` in q, k, v order; ``None`` means no slicing."""
    if qkv is None:
        return None
    items = re.findall(r"[^,\s]+", qkv) if isinstance(qkv, str) else [str(k).strip() for k in qkv]
    bad = [k for k in items if k not in QKV_SLICES]
    if bad or not items or len(set(items)) != len(items):
        raise ValueError(f"qkv must be a non-empty subset of q,k,v without repeats, got {qkv!r}")
    return [k for k in QKV_SLICES if k in items]


def make_lora_config(
    rank: int,
    alpha: float,
    dropout: float,
    init: str,
    rslora: bool,
    dora: bool,
    qkv: str | Iterable[str] | None,
) -> dict[str, Any]:
    """Validated, JSON-able LoRA hyper-parameters (the form stored in ``adapter_config``)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return {
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "init": init,
        "rslora": bool(rslora),
        "dora": bool(dora),
        "qkv": parse_qkv(qkv),
    }


def _rows_and_cols(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def check_lora_targets(matched: list[tuple[str, nn.Module]], config: dict[str, Any]) -> None:
    """Refuse every module LoRA cannot adapt exactly, naming all of them at once."""
    grouped = [n for n, m in matched if isinstance(m, nn.Conv2d) and m.groups > 1]
    if grouped:
        raise ValueError(
            f"LoRA cannot adapt grouped/depthwise convolutions (groups > 1): {grouped}; exclude them from targets"
        )
    bypassed = [n for n, m in matched if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    if bypassed:
        raise ValueError(
            f"LoRA cannot adapt {bypassed}: nn.MultiheadAttention reads out_proj.weight directly and never "
            "calls its forward, so the adapter would be ignored"
        )
    standardised = [n for n, m in matched if isinstance(m, _weight_standardised_convs())]
    if standardised:
        raise ValueError(
            f"LoRA cannot adapt weight-standardised convolutions (StdConv2d family): {standardised}"
        )
    if config["qkv"] is not None:
        bad = [n for n, m in matched if not isinstance(m, nn.Linear) or m.out_features % 3]
        if bad:
            raise ValueError(f"qkv slicing needs nn.Linear layers with out_features divisible by 3: {bad}")
    if config["init"] == "pissa":
        rank = config["rank"]
        too_small = []
        for n, m in matched:
            rows, cols = _rows_and_cols(m)
            rows = rows // 3 if config["qkv"] is not None else rows
            if rank > min(rows, cols):
                too_small.append(f"{n} (max rank {min(rows, cols)})")
        if too_small:
            raise ValueError(f"pissa init needs rank <= min(out, in·kh·kw) of each weight block: {too_small}")


def _conv_like(base: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """Same class and geometry as ``base`` (stride, padding incl. TF-"same", dilation, padding_mode) with a
    fresh bias-free (out_channels, in, kh, kw) weight; built without deep-copying the base weights."""
    conv = type(base).__new__(type(base))
    nn.Module.__init__(conv)
    for key, value in base.__dict__.items():
        if key not in conv.__dict__:
            conv.__dict__[key] = copy.copy(value)
    for key, child in base._modules.items():
        conv._modules[key] = copy.deepcopy(child)
    conv.training = base.training
    conv.out_channels = out_channels
    weight = base.weight
    conv.weight = nn.Parameter(
        torch.empty(out_channels, *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    )
    conv.register_parameter("bias", None)
    return conv


def _initialise(lora_a: nn.Module, lora_b: nn.Module, init: str, rank: int) -> None:
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / rank)
        else:
            # Same as nn.Linear's default; PiSSA overwrites it afterwards.
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)


def add_lora(module: nn.Module, config: dict[str, Any], initialise: bool = True) -> None:
    """Turn ``module`` into ``LoRA[type(module)]`` in place.

    ``initialise=False`` (used when loading) zeroes A and B and skips PiSSA's SVD: the loaded tensors,
    including a PiSSA residual ``weight``, overwrite them anyway, and zeros keep the layer a no-op if not.
    """
    weight = module.weight
    rank = config["rank"]
    factory = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(module, nn.Conv2d):
        lora_a: nn.Module = _conv_like(module, rank)
        lora_b: nn.Module = nn.Conv2d(rank, module.out_channels, 1, bias=False, **factory)
        pairs = [(lora_a, lora_b)]
    elif config["qkv"] is not None:
        d = module.out_features // 3
        lora_a = nn.ModuleDict(
            {k: nn.Linear(module.in_features, rank, bias=False, **factory) for k in config["qkv"]}
        )
        lora_b = nn.ModuleDict({k: nn.Linear(rank, d, bias=False, **factory) for k in config["qkv"]})
        pairs = [(lora_a[k], lora_b[k]) for k in config["qkv"]]
    else:
        lora_a = nn.Linear(module.in_features, rank, bias=False, **factory)
        lora_b = nn.Linear(rank, module.out_features, bias=False, **factory)
        pairs = [(lora_a, lora_b)]
    for a, b in pairs:
        if initialise:
            _initialise(a, b, config["init"], rank)
        else:
            with torch.no_grad():
                a.weight.zero_()
                b.weight.zero_()

    swap_in(module, LoRALayer)
    module.lora_config = copy.deepcopy(config)
    module.scaling = config["alpha"] / (math.sqrt(rank) if config["rslora"] else rank)
    module.lora_A = lora_a
    module.lora_B = lora_b
    module.lora_dropout = nn.Dropout(config["dropout"]) if config["dropout"] > 0 else nn.Identity()
    # New modules start in train mode; adapting an eval-mode model must not switch its dropout on.
    for child in (module.lora_A, module.lora_B, module.lora_dropout):
        child.train(module.training)
    if initialise and config["init"] == "pissa":
        pissa_init_(module)
    if config["dora"]:
        _dora.init_magnitude(module)


def apply_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    rslora: bool = False,
    dora: bool = False,
    qkv: str | Iterable[str] | None = None,
) -> list[str]:
    """Add LoRA to every Linear/Conv2d whose full module name full-matches a regex in ``targets``.

    Returns the sorted adapted module names. Validation happens before any module is touched, so a
    refused call leaves the model unchanged.
    """
    config = make_lora_config(rank, alpha, dropout, init, rslora, dora, qkv)
    matched = find_targets(model, targets, (nn.Linear, nn.Conv2d), "apply_lora")
    check_lora_targets(matched, config)
    for _, module in matched:
        add_lora(module, config)
    return sorted(name for name, _ in matched)
