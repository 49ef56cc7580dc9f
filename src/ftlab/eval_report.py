"""Test-set figures in TensorBoard: confusion matrix, per-class accuracy, the worst misclassified images or texts.

A Lightning callback (``callbacks.eval_report`` in ``conf/callbacks/default.yaml``). It reads the
logits the module's ``test_step`` returns, counts the confusion matrix (summed over DDP ranks) and
keeps the ``worst_images`` misclassified test images with the most confident wrong prediction
(rank 0's share under DDP). Images are shown denormalised with the run's own mean/std. Nothing is
drawn when the run has no TensorBoard logger.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch


def _sample(x: Any, i: int) -> Any:
    """Sample ``i`` of a batch, on the CPU: an image tensor, or a text's real (unpadded) token ids."""
    if isinstance(x, dict):
        ids = x["input_ids"][i]
        mask = x.get("attention_mask")
        return {"input_ids": (ids[mask[i].bool()] if mask is not None else ids).detach().cpu().clone()}
    return x[i].detach().cpu().clone()


def _decode(tokenizer: Any, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(str(t) for t in ids.tolist())
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def worst_texts_markdown(rows: Sequence[tuple[str, str, str, float, float]]) -> str:
    """A markdown table (TensorBoard's Text tab renders it) of the most confident mistakes."""
    lines = ["| p(pred) | true (p) | predicted | text |", "|---:|---|---|---|"]
    for text, true, pred, p_pred, p_true in rows:
        cell = " ".join(text.split()).replace("|", "\\|")
        lines.append(f"| {p_pred:.2f} | {true} ({p_true:.2f}) | {pred} | {cell} |")
    return "\n".join(lines)


def _tensorboard(trainer: L.Trainer) -> Any | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _render(fig: Any) -> np.ndarray:
    """An Agg-drawn figure as an HxWx3 uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(cm: np.ndarray, names: Sequence[str]) -> np.ndarray:
    from matplotlib.figure import Figure

    n = len(names)
    size = min(16.0, max(4.5, 0.45 * n + 2.0))
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    ax = fig.subplots()
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= 50:
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 25:  # counts stay legible up to here
        for (i, j), count in np.ndenumerate(cm):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (test, {int(cm.sum())} images)")
    return _render(fig)


def per_class_figure(acc: np.ndarray, support: np.ndarray, names: Sequence[str]) -> np.ndarray:
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(8, min(30.0, max(3.0, 0.28 * n + 1.2))), layout="constrained")
    ax = fig.subplots()
    values = np.nan_to_num(acc, nan=0.0)
    ax.barh(range(n), values, color="tab:blue", alpha=0.8)
    for i, (a, s) in enumerate(zip(acc, support, strict=True)):
        ax.text(min(values[i], 1.0), i, f" {a:.3f} (n={int(s)})" if s else " (no images)", va="center", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=8 if n <= 60 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("accuracy (recall) per true class")
    ax.set_title("per-class test accuracy")
    return _render(fig)


def worst_figure(items: list[tuple[np.ndarray, str, str, float, float]]) -> np.ndarray:
    """items: (HxWxC image in [0, 1], true name, predicted name, p(predicted), p(true)).

    One mosaic image on one Axes, a caption above each tile: a grid of Axes (one per image) draws the
    same picture at several times the cost, which the test stage of every run would pay.
    """
    from matplotlib.figure import Figure

    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    size = max(max(img.shape[:2]) for img, *_ in items)
    width, title = 2.4 * cols, 0.35  # inches: the figure's width, and the room for its title
    gap = max(2, size // 12)  # mosaic pixels between tiles
    cell_w = size + gap
    # Room above each tile for its two-line caption: about 0.36 inch at the scale the mosaic is drawn.
    caption = math.ceil(0.36 * cols * cell_w / width)
    cell_h = caption + size + gap
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3))
    fig = Figure(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + title))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title / fig.get_figheight()))
    ax.axis("off")
    for k, (img, true, pred, p_pred, p_true) in enumerate(items):
        r, c = divmod(k, cols)
        top, left = r * cell_h + caption, c * cell_w + gap // 2
        h, w = img.shape[:2]
        mosaic[top:top + h, left:left + w] = img[..., :3]  # a 1-channel image broadcasts to grey
        ax.text(left + w / 2, top - 1, f"true: {true} ({p_true:.2f})\npred: {pred} ({p_pred:.2f})",
                ha="center", va="bottom", fontsize=8, color="darkred")
    ax.imshow(mosaic, interpolation="nearest")
    fig.suptitle("most confident test mistakes: true / predicted class (probability)", fontsize=9)
    return _render(fig)


class EvalReport(L.Callback):
    def __init__(self, worst_images: int = 16, class_scalars_max: int = 100) -> None:
        super().__init__()
        self.worst_images = worst_images
        # Beyond this many classes the per-class scalars would swamp the Scalars tab (the figure remains).
        self.class_scalars_max = class_scalars_max
        self._confusion: torch.Tensor | None = None
        self._worst: list[tuple[float, int, torch.Tensor, int, int, float]] = []
        self._tie = itertools.count()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = int(pl_module.hparams.num_classes)
        self._confusion = torch.zeros(n, n, dtype=torch.long)
        self._worst = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, torch.Tensor) or self._confusion is None:
            return
        x, y = batch
        probs = outputs.detach().float().softmax(1).cpu()
        y = y.cpu()
        pred = probs.argmax(1)
        n = self._confusion.shape[0]
        self._confusion += torch.bincount(y * n + pred, minlength=n * n).view(n, n)
        if not self.worst_images:
            return
        for i in (pred != y).nonzero().flatten().tolist():
            p_pred, p_true = probs[i, pred[i]].item(), probs[i, y[i]].item()
            if len(self._worst) < self.worst_images or p_pred > self._worst[0][0]:
                item = (p_pred, next(self._tie), _sample(x, i), int(y[i]), int(pred[i]), p_true)
                if len(self._worst) < self.worst_images:
                    heapq.heappush(self._worst, item)
                else:
                    heapq.heapreplace(self._worst, item)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._confusion is None:
            return
        confusion = self._confusion
        if trainer.world_size > 1:
            confusion = pl_module.all_gather(confusion.to(pl_module.device)).sum(0).cpu()
        if not trainer.is_global_zero:
            return
        writer = _tensorboard(trainer)
        if writer is None:
            return
        names = list(getattr(pl_module, "class_names", None) or range(confusion.shape[0]))
        names = [str(n) for n in names]
        cm = confusion.numpy()
        support = cm.sum(1)
        acc = np.divide(np.diag(cm), support, out=np.full(len(names), np.nan), where=support > 0)
        step = trainer.global_step
        writer.add_image("test/confusion_matrix", confusion_figure(cm, names), step, dataformats="HWC")
        writer.add_image("test/per_class_accuracy", per_class_figure(acc, support, names), step, dataformats="HWC")
        if len(names) <= self.class_scalars_max:
            for name, value in zip(names, acc, strict=True):
                if not math.isnan(value):
                    writer.add_scalar(f"test_per_class/acc_{name}", float(value), step)
        worst = sorted(self._worst, key=lambda t: -t[0])
        if worst and isinstance(worst[0][2], dict):  # texts: a table of the decoded token ids
            tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
            rows = [(_decode(tokenizer, sample["input_ids"]), names[true], names[pred], p_pred, p_true)
                    for p_pred, _, sample, true, pred, p_true in worst]
            writer.add_text("test/worst_misclassified", worst_texts_markdown(rows), step)
        elif worst:
            mean, std = self._mean_std(trainer, pl_module)
            items = []
            for p_pred, _, img, true, pred, p_true in worst:
                pixels = (img.float() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
                items.append((pixels.permute(1, 2, 0).numpy(), names[true], names[pred], p_pred, p_true))
            writer.add_image("test/worst_misclassified", worst_figure(items), step, dataformats="HWC")
        writer.flush()
        self._worst = []

    @staticmethod
    def _mean_std(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        datamodule = getattr(trainer, "datamodule", None)
        pre = getattr(datamodule, "preprocessing", None) or getattr(pl_module, "data_config", None) or {}
        mean = torch.tensor(pre.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)
        std = torch.tensor(pre.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)
        return mean, std
