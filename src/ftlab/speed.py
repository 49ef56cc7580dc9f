"""``trainer.compile``, ``trainer.channels_last`` and the fused optimizer: how the model runs, not what it learns.

Both keep parameter names, checkpoints and artifacts exactly as without them:
- ``compile`` uses :meth:`torch.nn.Module.compile` in place (``torch.compile(net)`` would wrap the
  network and prefix every state-dict key with ``_orig_mod.``). The first steps pay the compilation
  (minutes on a small CPU); it pays off on long runs, mostly on GPUs.
- ``channels_last`` stores 4-D conv weights and the input batches as NHWC, the layout that oneDNN and
  cuDNN convolution kernels (tensor cores) prefer. It changes memory layout only, never values' meaning.
  ``auto`` (the default) turns it on for conv nets (:func:`is_conv_net`) and leaves it off otherwise
  (ViT-style patch embeddings, text models) and for :data:`NO_GAIN_FAMILIES`; ``bench/channels_last.py``
  measures each family.
- the optimizer's fused kernel (:func:`fused_optimizer_arguments`): torch's AdamW updates every tensor in
  one kernel instead of a loop of per-tensor operations; the same update up to float32 rounding.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ftlab.errors import UserError

log = logging.getLogger(__name__)

SPEED_KEYS = ("compile", "channels_last")


# Conv-net families whose training step NHWC did not speed up in `make bench` (bench/channels_last.py):
# ConvNeXt (timm and torchvision name their class so) ran level with NCHW on the CPU, so `auto` leaves it off.
NO_GAIN_FAMILIES = ("ConvNeXt",)


def is_conv_net(net: nn.Module) -> bool:
    """Whether ``net`` slides convolutions over feature maps: it has a ``Conv2d`` whose kernel is larger
    than its stride (ResNet, EfficientNet, MobileNet, ConvNeXt). A patch embedding (kernel = stride: ViT,
    DeiT, Swin), LoRA's 1x1 up-projection and text models do not count."""
    return any(isinstance(m, nn.Conv2d) and any(k > s for k, s in zip(m.kernel_size, m.stride, strict=True))
               for m in net.modules())


def resolve_channels_last(setting: bool | str, net: nn.Module) -> bool:
    """``trainer.channels_last``: true/false as given; ``auto`` on for conv nets (:func:`is_conv_net`)
    outside :data:`NO_GAIN_FAMILIES`."""
    if setting != "auto":
        return bool(setting)
    family = next((f for f in NO_GAIN_FAMILIES if any(c.__name__ == f for c in type(net).__mro__)), None)
    on = family is None and is_conv_net(net)
    reason = ("a conv net" if on else f"{family}: measured no faster in NHWC" if family
              else "no sliding convolution: patch embedding or text model")
    log.info("trainer.channels_last=auto: %s (%s)", "on" if on else "off", reason)
    return on


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Image batches (4-D) in NHWC; anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def apply_speed_options(model: nn.Module, compile: bool = False, channels_last: bool | str = "auto") -> None:
    """Apply ``trainer.compile`` / ``trainer.channels_last`` to a :class:`ftlab.module.ClassifierModule`."""
    if resolve_channels_last(channels_last, model.net):
        model.net.to(memory_format=torch.channels_last)
        model.channels_last = True
    if compile:
        if not torch.cuda.is_available() and shutil.which("cc") is None and shutil.which("gcc") is None:
            raise UserError("trainer.compile=true: torch.compile on CPU needs a C compiler (cc/gcc) on PATH")
        log.info("trainer.compile=true: the first steps compile the network")
        model.net.compile()


def keep_determinism_cheap() -> None:
    """Under ``trainer.deterministic`` torch also fills every new tensor with NaN, to expose ops that read
    uninitialised memory. ftlab's ops write what they read, so the fill only costs time: about a quarter of
    a CPU training step (EfficientNet-Lite0, 224 px). Seeded runs stay bit-for-bit repeatable without it."""
    if torch.are_deterministic_algorithms_enabled():
        torch.utils.deterministic.fill_uninitialized_memory = False


def fused_optimizer_arguments(factory: Callable[..., Any], groups: Sequence[dict[str, Any]],
                              trainer: Any = None) -> dict[str, bool]:
    """``{"fused": True}`` where torch's fused optimizer kernel is safe, else ``{}`` (torch's own default).

    Fused means one kernel for the whole update: an AdamW step over EfficientNet-Lite0's weights took 5 ms
    instead of 15 ms on a 2-core CPU (``bench/speed_options.py`` times whole training steps). Used when
    - the optimizer is one of torch's that takes ``fused`` (Adam, AdamW, SGD, Adagrad) and
      ``model.optimizer`` sets neither ``fused`` nor ``foreach`` (``+model.optimizer.fused=false`` opts out);
    - every trainable tensor is a float32 tensor on the CPU or a CUDA device;
    - the run is in full precision on one device or under DDP: with a gradient scaler (``16-mixed``)
      Lightning refuses fused optimizers when gradients are clipped, and FSDP's shards are not plain tensors.
    """
    func = getattr(factory, "func", factory)
    given = getattr(factory, "keywords", None) or {}
    if "fused" in given or "foreach" in given:
        return {}
    if not (isinstance(func, type) and issubclass(func, torch.optim.Optimizer)
            and func.__module__.startswith("torch.optim.")):
        return {}
    if "fused" not in inspect.signature(func).parameters:
        return {}
    tensors = [p for g in groups for p in g["params"]]
    if not tensors or any(p.dtype != torch.float32 or p.device.type not in ("cpu", "cuda") for p in tensors):
        return {}
    if len({p.device for p in tensors}) > 1:
        return {}
    if trainer is not None:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if str(trainer.precision) != "32-true" or not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            return {}
    return {"fused": True}
