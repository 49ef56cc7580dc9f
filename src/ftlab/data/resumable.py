"""Samplers and a loader that make training resumable mid-epoch and evaluation exact under DDP.

Lightning 2.x restores its loop counters from a mid-epoch checkpoint and then runs only the batches
the epoch has left, but it draws them from a fresh iterator: without help the resumed epoch would
re-see the first batches of some shuffle and never see the rest. The data module stores the position
(:func:`train_position`) in every checkpoint, and :class:`ResumableSampler` continues that epoch's
own permutation exactly where training stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A per-epoch seeded shuffle (``seed + epoch``), sharded over ranks, that can start mid-epoch.

    It subclasses :class:`DistributedSampler` so that Lightning uses it as is under DDP instead of
    wrapping it (a wrapper would pad the shortened resumed epoch with repeated samples).

    ``weights`` (one per sample, ``data.sampler=balanced``): instead of a permutation, each epoch draws
    ``len(dataset)`` indices (rounded up to a multiple of the ranks) with replacement, sample ``i`` with
    probability proportional to ``weights[i]``, from a generator seeded ``seed + epoch``. Every rank makes
    the same draw and keeps every ``num_replicas``-th index from position ``rank``: its own share, as the
    permutation is shared out, and a resumed epoch continues the same draw.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, weights: Sequence[float] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None
        if weights is not None and len(weights) != len(dataset):
            raise ValueError(f"one weight per sample: {len(weights)} weights for {len(dataset)} samples")
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def epoch_indices(self) -> list[int]:
        """This rank's indices of the whole current epoch (``self.epoch``)."""
        if self.weights is None:
            return list(DistributedSampler.__iter__(self))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return drawn[self.rank:self.total_size:self.num_replicas].tolist()

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next pass epoch ``epoch`` of the shuffle, minus its first ``skip`` samples (this rank)."""
        self.epoch = epoch
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            # Lightning may create the iterator before it calls set_epoch(): the resumed epoch wins once.
            self.epoch, skip = self._resume
            self._resume = None
        return iter(self.epoch_indices()[skip:])


class ShardSampler(DistributedSampler):
    """Evaluation shards without padding: every sample is scored exactly once across ranks.

    The default DistributedSampler repeats samples to even out the ranks, which biases test metrics.
    torchmetrics syncs states (not per-rank means), so uneven shards give exact totals.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = max(0, math.ceil((len(dataset) - rank) / num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """The train loader. Being "stateful" tells Lightning that resuming it mid-epoch is supported.

    The position itself travels through the data module (:func:`train_position`,
    :func:`resume_point`): when ``configure_optimizers`` asks for ``estimated_stepping_batches``,
    Lightning builds the train loader before it restores a checkpoint and never hands this loader
    its saved state, whereas the data module's state is restored before any loader exists.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing: see the class docstring."""


def train_position(trainer: Any, batch_size: int) -> dict[str, int]:
    """Where training stands, from the trainer's own counters (loader workers and Lightning's fetcher
    read ahead, so counting fetched batches would overshoot)."""
    if trainer is None or getattr(trainer, "fit_loop", None) is None:
        return {}
    return {
        "epoch": int(trainer.current_epoch),
        "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
        "num_batches": int(trainer.num_training_batches),
        "batch_size": int(batch_size),
    }


def resume_point(state: dict[str, Any]) -> tuple[int, int] | None:
    """``(epoch, samples to skip on this rank)`` for :meth:`ResumableSampler.resume`.

    ``state`` is what :func:`train_position` returned when the checkpoint was written.
    """
    if not state or "batches_done" not in state:
        return None
    epoch, done = int(state["epoch"]), int(state["batches_done"])
    if done >= int(state["num_batches"]):
        # Saved after the epoch's last batch (e.g. at validation end): the next epoch starts fresh.
        return epoch + 1, 0
    return epoch, done * int(state["batch_size"])
