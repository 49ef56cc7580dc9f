"""Fine-tuning strategies: each a small subclass of :class:`ftlab.module.ClassifierModule`."""

from ftlab.methods.full import FullFineTuning

__all__ = ["FullFineTuning"]
