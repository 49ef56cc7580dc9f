"""Framework overhead: ftlab's training loop vs a bare PyTorch loop on the same model and data.

Both sides train the default experiment's model (method, backbone, optimizer groups, warmup-cosine
schedule, gradient clipping at ``trainer.gradient_clip_val``) on the same images, pre-transformed and
held in memory, at the same batch size. ftlab runs as a user has it: Lightning Trainer, ftlab's
DataModule loaders, progress bar, TensorBoard and learning-rate logging, metrics, step checkpoints.
Only training batches are timed (from the epoch's start to the start of its validation).

The sides alternate epoch by epoch: after each of ftlab's epochs, a callback runs one epoch of the bare
loop on its own copy of the model, so every pair of epochs meets the same machine. On a shared 2-core
machine consecutive epochs of one side vary by ±15 %; pairing them, many times, is what keeps the ratio
from following that noise. ftlab's first epoch and the bare loop's first are warm-up.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, parse_args, row, write_result


def _in_memory(dataset: Any, n: int) -> tuple[Any, Any]:
    import torch

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class EpochTimer:
    """Seconds of each training epoch up to the start of its validation."""

    def __init__(self) -> None:
        import lightning as L

        class _Timer(L.Callback):
            def on_train_epoch_start(cb, trainer: Any, module: Any) -> None:  # noqa: N805
                self._t0 = time.perf_counter()
                self._open = True

            def on_validation_start(cb, trainer: Any, module: Any) -> None:  # noqa: N805
                self._close()

            def on_train_epoch_end(cb, trainer: Any, module: Any) -> None:  # noqa: N805
                self._close()

        self.callback = _Timer()
        self.epochs: list[float] = []
        self._open = False

    def _close(self) -> None:
        if self._open:
            self.epochs.append(time.perf_counter() - self._t0)
            self._open = False


class BareLoop:
    """The bare PyTorch loop, one epoch per call, on its own copy of the seeded model."""

    def __init__(self, cfg: Any, x: Any, y: Any, epochs: int) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from ftlab.module import warmup_cosine
        from ftlab.train import build

        _, model, _ = build(cfg)  # the same seeded model as ftlab's side builds
        self.model = copy.deepcopy(model)
        self.optimizer = self.model.make_optimizer()
        self.loader = DataLoader(TensorDataset(x, y), batch_size=cfg.data.batch_size, shuffle=True)
        total = epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, cfg.model.warmup_ratio))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.clip = cfg.trainer.gradient_clip_val
        self.epochs: list[float] = []

    def epoch(self) -> None:
        import torch

        model, optimizer = self.model, self.optimizer
        model.train()  # ClassifierModule.train keeps frozen norm statistics in eval mode, as in ftlab
        t0 = time.perf_counter()
        for xb, yb in self.loader:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model.net(xb), yb)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            optimizer.step()
            self.scheduler.step()
        self.epochs.append(time.perf_counter() - t0)


def paired_epochs(cfg: Any, x: Any, y: Any, epochs: int) -> tuple[list[float], list[float]]:
    """ftlab's epochs and the bare loop's, alternating: one bare epoch after each of ftlab's."""
    import lightning as L
    from torch.utils.data import TensorDataset

    from ftlab.train import build

    bare = BareLoop(cfg, x, y, epochs)

    class _Bare(L.Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            bare.epoch()

    timer = EpochTimer()
    datamodule, model, trainer = build(cfg, extra_callbacks=[timer.callback, _Bare()])
    datamodule.setup("fit")
    datamodule.datasets["train"] = TensorDataset(x, y)
    datamodule.setup = lambda stage=None: None  # keep the in-memory train set
    trainer.fit(model, datamodule=datamodule)
    return timer.epochs, bare.epochs


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    n_images, epochs = (64, 2) if args.tiny else (640, 13)
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    overrides = [f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
                 "trainer.devices=1", "data.num_workers=0", "test=false"]
    if args.tiny:
        overrides += TINY_OVERRIDES
    cfg = compose(overrides, tmp / "run0")
    from ftlab.train import build

    datamodule, _, _ = build(cfg)
    datamodule.setup("fit")
    x, y = _in_memory(datamodule.datasets["train"], n_images)

    cfg = compose(overrides, tmp / "run1")
    ours, bare = (e[1:] for e in paired_epochs(cfg, x, y, epochs))
    ours_ips = len(x) / statistics.median(ours)
    bare_ips = len(x) / statistics.median(bare)
    method = cfg.model._target_.rsplit(".", 1)[-1]
    detail = (f"{method} on {cfg.model.name}, {cfg.data.image_size or ''} px, batch {cfg.data.batch_size}, "
              f"{len(x)} images in memory: ftlab {ours_ips:.1f} img/s vs bare loop {bare_ips:.1f} img/s "
              f"(median of {len(ours)} epochs each, alternating epoch by epoch)")
    rows = [row("framework overhead: ftlab / bare loop images/s", ours_ips / bare_ips, "≥ 0.95", detail, args.tiny)]
    write_result("overhead", args.out, rows, {"images": len(x), "epochs": epochs, "overrides": overrides,
                                               "ftlab_epochs": [round(t, 3) for t in ours],
                                               "bare_epochs": [round(t, 3) for t in bare]}, started)


if __name__ == "__main__":
    main()
