"""Class imbalance: ``data.sampler=balanced`` (every class drawn equally often) and ``model.class_weights=auto``
(inverse class frequency in the training loss), both computed from the train split's labels."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ftlab.errors import UserError

log = logging.getLogger(__name__)

# data.sampler: shuffle = a seeded permutation per epoch; balanced = classes drawn with equal probability
# (with replacement), the epoch still as long as the train split.
SAMPLERS = ("shuffle", "balanced")


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Samples per class index, ``0 .. num_classes - 1``."""
    counts = Counter(int(y) for y in labels)
    return [counts.get(c, 0) for c in range(num_classes)]


def balanced_sample_weights(labels: Sequence[int]) -> list[float]:
    """One weight per sample, ``1 / (samples of its class)``: each class then has the same total weight."""
    counts = Counter(int(y) for y in labels)
    return [1.0 / counts[int(y)] for y in labels]


def inverse_frequency(counts: Sequence[int]) -> list[float]:
    """``N / (C * n_c)`` per class (scikit-learn's "balanced"): rare classes weigh more, and the weight
    averaged over the training samples is 1. A class without training samples gets 0 (it cannot be learnt)."""
    total, present = sum(counts), sum(1 for n in counts if n > 0)
    return [total / (present * n) if n > 0 else 0.0 for n in counts]


def valid_class_weights(value: Any) -> bool:
    """``model.class_weights``: null, auto, or a list of numbers >= 0 with at least one > 0."""
    if value is None or value == "auto":
        return True
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in value)
            and any(w > 0 for w in value))


def resolve_class_weights(value: Any, labels: Sequence[int], classes: Sequence[str]) -> list[float] | None:
    """``model.class_weights`` as the list the loss uses: ``auto`` from the train labels, a list checked
    against the number of classes, null unchanged."""
    if value is None:
        return None
    if value == "auto":
        counts = class_counts(labels, len(classes))
        weights = inverse_frequency(counts)
        log.info("model.class_weights=auto: %s", ", ".join(f"{c} {w:.3g} ({n})" for c, w, n in
                                                          zip(classes, weights, counts, strict=True)))
        return weights
    if not valid_class_weights(value):
        raise UserError(f"model.class_weights={value!r}: must be null, auto or a list of numbers >= 0, one per class")
    if len(value) != len(classes):
        raise UserError(f"model.class_weights={list(value)!r}: {len(value)} weights for {len(classes)} classes "
                        f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); give one per class")
    return [float(w) for w in value]
