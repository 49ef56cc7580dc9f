"""What every ftlab DataModule shares: loaders with a resumable seeded shuffle (or class-balanced draw),
no short last train batch, DDP test shards, the feature cache hook, and the train position Lightning stores
in checkpoints.

A subclass (images: :mod:`ftlab.data.imagefolder`, texts: :mod:`ftlab.data.text`) builds
``self.datasets`` (train/val/test; each with ``samples``, ``(input, class index)`` pairs) in ``setup``, sets
``sampler`` (``data.sampler``) and ``drop_last`` (``data.drop_last``), and may override
:meth:`train_sampler` and :meth:`loader_options` (collate function, worker start method).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from ftlab.data.feature_cache import FeatureCache
from ftlab.data.imbalance import balanced_sample_weights
from ftlab.data.resumable import ResumableLoader, ResumableSampler, ShardSampler, resume_point, train_position
from ftlab.data.workers import inference_workers


class SplitDataModule(L.LightningDataModule):
    batch_size: int
    num_workers: int
    seed: int
    datasets: dict[str, Dataset]
    # data.sampler: shuffle (a seeded permutation per epoch) or balanced (ftlab.data.imbalance).
    sampler: str = "shuffle"
    # data.drop_last: drop the epoch's short last train batch when this rank has more than a batch.
    drop_last: bool = True
    # data.num_workers=auto (a subclass sets it): the test split may then use fewer workers (see _workers).
    auto_workers: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.feature_cache: FeatureCache | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip) after a mid-epoch restart

    # -- what subclasses may change ------------------------------------------------------------
    def train_sampler(self, dataset: Dataset, world: int, rank: int) -> ResumableSampler:
        """The seeded, resumable shuffle of the train split (this rank's share of it)."""
        return ResumableSampler(dataset, world, rank, seed=self.seed, shuffle=True,
                                weights=self.sample_weights(dataset))

    def sample_weights(self, dataset: Dataset) -> list[float] | None:
        """Per-sample draw weights of the train split: ``data.sampler=balanced`` gives every class the same
        total weight; None is a plain shuffle."""
        if self.sampler != "balanced":
            return None
        return balanced_sample_weights([y for _, y in dataset.samples])

    def train_labels(self) -> list[int]:
        """The class index of every train sample (``model.class_weights=auto`` counts them)."""
        self.discover()
        return [y for _, y in self._splits["train"]]

    def drops_last(self, sampler: Sampler) -> bool:
        """Whether the train loader drops its short last batch: ``data.drop_last`` and this rank's share of an
        epoch is larger than a batch (a smaller train split keeps its one batch). A short batch of a few
        samples in BatchNorm train mode gives a noisy step (timm drops it too). Val and test keep every sample."""
        return bool(self.drop_last) and len(sampler) > self.batch_size

    def loader_options(self) -> dict[str, Any]:
        """Extra DataLoader arguments (``collate_fn``, ``multiprocessing_context``, ...)."""
        return {}

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, split: str) -> DataLoader:
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = self.datasets[split]
        # Train: a seeded, resumable shuffle (ftlab.data.resumable). Test: unpadded shards, so that under
        # DDP every sample is scored once. Val keeps Lightning's sampler (equal batch counts per rank).
        sampler: Sampler | None = None
        drop_last = False
        if split == "train":
            sampler = self.train_sampler(dataset, world, rank)
            if self._resume is not None:
                sampler.resume(*self._resume)
                self._resume = None
            # From the whole epoch's length (a resumed epoch skips whole batches, so its tail is the same).
            drop_last = self.drops_last(sampler)
        elif split == "test" and world > 1:
            sampler = ShardSampler(dataset, num_replicas=world, rank=rank)
        options = self.loader_options()
        workers = self._workers(split, on_gpu)
        if workers == 0:
            options.pop("multiprocessing_context", None)
        if self.feature_cache is not None and self.feature_cache.serves(split):
            return self.feature_cache.loader(split, dataset, self.batch_size, sampler,
                                             collate_fn=options.get("collate_fn"), drop_last=drop_last)
        loader_cls = ResumableLoader if split == "train" else DataLoader
        return loader_cls(
            dataset,
            batch_size=self.batch_size,
            shuffle=False if sampler is None else None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=on_gpu,
            drop_last=drop_last,
            **options,
        )

    def _workers(self, split: str, on_gpu: bool) -> int:
        """``data.num_workers`` for this split. The test split is read once: on the CPU with ``auto`` it gets
        the cores torch's threads leave free (:func:`~ftlab.data.workers.inference_workers`; none on a 2-core
        machine), since workers started for one pass spend their start-up, and then share the cores the
        network already runs on. The default run's test stage took 0.74 s instead of 1.25 s this way."""
        if split == "test" and self.auto_workers and not on_gpu:
            return inference_workers("auto", on_cpu=True)
        return self.num_workers

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- resuming mid-epoch: Lightning stores these in every checkpoint -------------------------
    def state_dict(self) -> dict[str, int]:
        return train_position(self.trainer, self.batch_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = resume_point(state)
