"""SFT: full fine-tuning, every weight trains (the base module's default)."""

from __future__ import annotations

from ftlab.module import ClassifierModule


class FullFineTuning(ClassifierModule):
    method = "full"

    def artifact_prefixes(self) -> list[str] | None:
        return None  # every weight changed: the artifact is the whole model
