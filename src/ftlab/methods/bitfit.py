"""BitFit: bias terms (normalisation shifts, where convs have no bias) plus the head."""

from __future__ import annotations

from ftlab.methods.groups import head_names, set_trainable
from ftlab.module import ClassifierModule


class BitFit(ClassifierModule):
    method = "bitfit"

    def configure_trainable(self) -> None:
        # In BN-based CNNs the convs carry no bias; the BN `bias` (β) is the shift that plays that role.
        biases = [n for n, _ in self.net.named_parameters() if n.endswith(".bias")]
        set_trainable(self.net, biases + head_names(self.net, self.head_name))
