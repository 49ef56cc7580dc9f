"""Fine-tuning strategies: each a small subclass of :class:`ftlab.module.ClassifierModule`.

A strategy decides which parameters exist and train; loss, metrics, optimizer and the loop are shared.
"""

from ftlab.methods.bitfit import BitFit
from ftlab.methods.dora import DoRA
from ftlab.methods.full import FullFineTuning
from ftlab.methods.gradual import GradualUnfreezing
from ftlab.methods.linear import LinearProbe
from ftlab.methods.lora import LoRA
from ftlab.methods.partial import PartialFineTuning
from ftlab.methods.ssf import ScaleShift

__all__ = [
    "BitFit", "DoRA", "FullFineTuning", "GradualUnfreezing", "LinearProbe", "LoRA", "PartialFineTuning", "ScaleShift",
]
