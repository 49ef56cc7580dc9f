"""Test-set figures in TensorBoard: confusion matrix, per-class accuracy, the worst misclassified images or texts.

A Lightning callback (``callbacks.eval_report`` in ``conf/callbacks/default.yaml``). It reads the
logits the module's ``test_step`` returns, counts the confusion matrix (summed over DDP ranks) and
keeps the ``worst_images`` misclassified test images with the most confident wrong prediction
(rank 0's share under DDP). Images are shown denormalised with the run's own mean/std. Nothing is
drawn when the run has no TensorBoard logger. The figures are drawn with Pillow straight into pixels: it
takes milliseconds, where matplotlib's layout and text took about 0.7 s of every run's test stage.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


# ColorBrewer's sequential "Blues" (9 classes), the ramp matplotlib's ``Blues`` interpolates: white to navy.
_BLUES = np.array([(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
                   (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], dtype=float)
_INK, _GRID, _BAR, _MISTAKE = (0, 0, 0), (200, 200, 200), (31, 119, 180), (139, 0, 0)


def _blues(share: np.ndarray) -> np.ndarray:
    """Colours (..., 3) uint8 of shares in [0, 1]."""
    at = np.clip(share, 0.0, 1.0) * (len(_BLUES) - 1)
    stops = np.arange(len(_BLUES))
    return np.stack([np.interp(at, stops, _BLUES[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """Pillow's built-in font, scalable where Pillow has FreeType (a fixed bitmap font otherwise)."""
    return ImageFont.load_default(size=size)


def _width(text: str, font: Any) -> int:
    return math.ceil(font.getlength(text))


def _height(font: Any) -> int:
    return font.getbbox("Ag(")[3]


def _clip(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _vertical(text: str, font: Any) -> Image.Image:
    """A text rotated to read bottom-up (an axis label or a tick label under a crowded axis)."""
    label = Image.new("RGB", (_width(text, font) + 2, _height(font) + 2), "white")
    ImageDraw.Draw(label).text((1, 0), text, fill=_INK, font=font)
    return label.rotate(90, expand=True)


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (int(width), int(height)), "white")
    return image, ImageDraw.Draw(image)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).copy()


def confusion_figure(cm: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Rows normalised to the share of each true class (the colour), counts written up to 25 classes,
    class names on the axes up to 50 classes, a colour bar. HxWx3 uint8."""
    n = len(names)
    cell = max(1, min(48, 800 // max(n, 1)))
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    font, small = _font(13), _font(11 if n <= 25 else 8)
    ticks = [_clip(str(v)) for v in names] if n <= 50 else []
    crowded = bool(ticks) and max(_width(t, small) for t in ticks) > cell - 4
    tick_w = max((_width(t, small) for t in ticks), default=0)
    line = _height(font)
    left = 8 + line + 8 + tick_w + 6
    top = line + 16
    below = (tick_w if crowded else _height(small)) + 6 if ticks else 0
    bottom = below + line + 14
    grid = cell * n
    bar_x = left + grid + 20
    right = bar_x + 14 + 6 + _width("1.0", small) + 8 + line + 8
    image, draw = _canvas(right, top + grid + bottom)
    # The matrix: one block of colour per cell.
    colours = _blues(share)
    block = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(block), (left, top))
    draw.rectangle((left - 1, top - 1, left + grid, top + grid), outline=_INK)
    if n <= 25 and cell >= 16:
        count_font = _font(max(8, min(13, cell // 3)))
        for (i, j), count in np.ndenumerate(cm):
            if count:
                draw.text((left + j * cell + cell / 2, top + i * cell + cell / 2), str(int(count)), anchor="mm",
                          font=count_font, fill=(255, 255, 255) if share[i, j] > 0.5 else _INK)
    for k, tick in enumerate(ticks):
        centre = k * cell + cell / 2
        draw.text((left - 6, top + centre), tick, anchor="rm", font=small, fill=_INK)
        if crowded:
            label = _vertical(tick, small)
            image.paste(label, (int(left + centre - label.width / 2), top + grid + 4))
        else:
            draw.text((left + centre, top + grid + 4), tick, anchor="mt", font=small, fill=_INK)
    draw.text((left + grid / 2, top + grid + below + 6), "predicted", anchor="mt", font=font, fill=_INK)
    label = _vertical("true", font)
    image.paste(label, (8, int(top + grid / 2 - label.height / 2)))
    draw.text((left + grid / 2, 6), f"confusion matrix (test, {int(cm.sum())} images)", anchor="mt", font=font,
              fill=_INK)
    # The colour bar: 1.0 at the top.
    bar_h = max(grid, 2)
    ramp = _blues(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(14, axis=1)
    image.paste(Image.fromarray(ramp), (bar_x, top))
    draw.rectangle((bar_x - 1, top - 1, bar_x + 14, top + bar_h), outline=_INK)
    for value in (0.0, 0.5, 1.0):
        y = top + (1.0 - value) * (bar_h - 1)
        draw.line((bar_x + 14, y, bar_x + 18, y), fill=_INK)
        draw.text((bar_x + 20, y), f"{value:.1f}", anchor="lm", font=small, fill=_INK)
    label = _vertical("share of the true class", font)
    image.paste(label, (bar_x + 20 + _width("1.0", small) + 8, int(top + grid / 2 - label.height / 2)))
    return _pixels(image)


def per_class_figure(acc: np.ndarray, support: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """One horizontal bar per true class: its accuracy (recall) and its number of test images. HxWx3 uint8."""
    n = len(names)
    row = max(3, min(20, 3000 // max(n, 1)))
    font = _font(13)
    small = _font(min(11, row - 4)) if row >= 9 else None
    labels = [_clip(str(v)) for v in names]
    tick_w = max((_width(t, small) for t in labels), default=0) if small else 0
    left, top, span = 12 + tick_w, _height(font) + 16, 400
    note_w = _width(" 1.000 (n=100000)", small) if small else 0
    height = top + row * n + 8 + _height(font) * 2 + 16
    image, draw = _canvas(left + span + note_w + 12, height)
    values = np.nan_to_num(acc, nan=0.0)
    bottom = top + row * n
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * span
        draw.line((x, top, x, bottom), fill=_GRID)
        draw.text((x, bottom + 4), f"{tick:g}", anchor="mt", font=font, fill=_INK)
    for i, (value, s) in enumerate(zip(values, support, strict=True)):
        y = top + i * row
        draw.rectangle((left, y + 1, left + value * span, y + row - 2), fill=_BAR)
        if small:
            draw.text((left - 6, y + row / 2), labels[i], anchor="rm", font=small, fill=_INK)
            note = f" {acc[i]:.3f} (n={int(s)})" if s else " (no images)"
            draw.text((left + value * span + 2, y + row / 2), note, anchor="lm", font=small, fill=_INK)
    draw.line((left, top, left, bottom), fill=_INK)
    draw.text((left + span / 2, bottom + 6 + _height(font)), "accuracy (recall) per true class", anchor="mt",
              font=font, fill=_INK)
    draw.text((left + span / 2, 6), "per-class test accuracy", anchor="mt", font=font, fill=_INK)
    return _pixels(image)


def worst_figure(items: list[tuple[np.ndarray, str, str, float, float]]) -> np.ndarray:
    """items: (HxWxC image in [0, 1], true name, predicted name, p(predicted), p(true)).

    A mosaic of up to four columns, each image under a two-line caption. Small images are enlarged by whole
    pixels (nearest neighbour) so the caption fits above them; large ones are shrunk to 256 pixels.
    """
    font = _font(12)
    side = max(max(img.shape[:2]) for img, *_ in items)
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    caption_w = max(_width(f"true: {_clip(t, 14)} ({pt:.2f})", font) for _, t, _, _, pt in items)
    caption_w = max(caption_w, *(_width(f"pred: {_clip(p, 14)} ({pp:.2f})", font) for _, _, p, pp, _ in items))
    scale = max(1, math.ceil(min(caption_w, 160) / side)) if side < 256 else 256 / side
    tile = max(1, round(side * scale))
    cell_w = max(tile, caption_w) + 12
    caption = 2 * (_height(font) + 2) + 4
    cell_h = caption + tile + 10
    heading = "most confident test mistakes: true / predicted class (probability)"
    title = _height(font) + 14
    width = max(cols * cell_w, _width(heading, font) + 12)
    image, draw = _canvas(width, title + rows * cell_h)
    draw.text((width / 2, 6), heading, anchor="mt", font=font, fill=_INK)
    x_pad = (width - cols * cell_w) // 2
    for k, (img, true, pred, p_pred, p_true) in enumerate(items):
        r, c = divmod(k, cols)
        x0, y0 = x_pad + c * cell_w, title + r * cell_h
        pixels = (np.clip(img[..., :3], 0.0, 1.0) * 255).round().astype(np.uint8)
        if pixels.shape[2] == 1:  # one channel: grey
            pixels = pixels.repeat(3, axis=2)
        h, w = pixels.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        picture = Image.fromarray(pixels).resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)
        image.paste(picture, (int(x0 + (cell_w - size[0]) / 2), y0 + caption))
        text = f"true: {_clip(true, 14)} ({p_true:.2f})\npred: {_clip(pred, 14)} ({p_pred:.2f})"
        draw.multiline_text((x0 + cell_w / 2, y0 + caption - 2), text, anchor="md", align="center", font=font,
                            fill=_MISTAKE, spacing=2)
    return _pixels(image)


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
