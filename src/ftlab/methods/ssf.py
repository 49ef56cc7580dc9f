"""SSF: a per-channel scale ω and shift δ after the targeted layers (θ' = ω·θ + δ); only ω, δ and the head train."""

from __future__ import annotations

from ftlab.adapters import apply_ssf, mark_trainable
from ftlab.methods.adapted import AdaptedModule


class ScaleShift(AdaptedModule):
    method = "ssf"

    def configure_trainable(self) -> None:
        targets = self.resolve_targets("ssf_targets")
        self.wrap_errors(apply_ssf, self.net, targets)
        mark_trainable(self.net, extra=[self.head_name])
