"""How many DataLoader worker processes to use, and how to start them."""

from __future__ import annotations

import os
import sys

from ftlab.errors import UserError

# Forked workers share memory copy-on-write (the in-memory caches); only where fork is safe.
CAN_FORK = sys.platform.startswith("linux")


def resolve_workers(value: int | str, key: str = "data.num_workers") -> int:
    """``auto``: one core left for the training process, at most 8; else the integer given."""
    if value == "auto":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    try:
        workers = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected auto or an integer >= 0") from None
    if workers < 0:
        raise UserError(f"{key}={value}: expected auto or an integer >= 0")
    return workers


def inference_workers(value: int | str, on_cpu: bool, key: str = "num_workers") -> int:
    """Image-decoding workers for ``ftlab predict``/``eval``: ``auto`` on the CPU is the cores torch's own
    threads leave free (none where torch uses them all: 2-core machines), since the network already runs on
    every core torch uses and a worker would only take CPU time from it (bench/peers.py measures ``predict``
    against a bare loop). Elsewhere as :func:`resolve_workers`."""
    if value == "auto" and on_cpu:
        import torch

        return max(0, min(8, (os.cpu_count() or 2) - torch.get_num_threads()))
    return resolve_workers(value, key=key)
