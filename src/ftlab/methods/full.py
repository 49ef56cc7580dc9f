"""SFT: full fine-tuning, every weight trains (the base module's default)."""

from ftlab.module import ClassifierModule


class FullFineTuning(ClassifierModule):
    method = "full"
