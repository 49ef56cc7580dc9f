"""A callback the DDP test of data.sampler=balanced adds with ``+callbacks.probe._target_=sampler_probe.SamplerProbe``:
each rank writes, per epoch, what its train sampler drew and the labels of the batches it trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class SamplerProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.labels: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.labels = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.labels += batch[1].tolist()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = loader.sampler
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "epoch": trainer.current_epoch,
            "sampler": type(sampler).__name__,
            "sampler_epoch": sampler.epoch,
            "indices": sampler.epoch_indices(),
            "dataset_labels": [y for _, y in loader.dataset.samples],
            "batch_labels": self.labels,
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
        }
        (self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))
