"""The test stage's TensorBoard figures: confusion matrix, per-class accuracy, the worst mistakes as one mosaic."""

from __future__ import annotations

import numpy as np

from ftlab.eval_report import confusion_figure, per_class_figure, worst_figure

NAVY, WHITE_BLUE, BAR = (8, 48, 107), (247, 251, 255), (31, 119, 180)


def _match(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 8) -> np.ndarray:
    return np.all(np.abs(rgb.astype(int) - np.array(colour)) < tol, axis=-1)


def _share(rgb: np.ndarray, colour: tuple[int, int, int]) -> float:
    return float(_match(rgb, colour).mean())


def test_worst_figure_draws_every_image_with_room_for_captions() -> None:
    red = np.zeros((24, 24, 3))
    red[..., 0] = 1.0
    grey = np.full((24, 24, 1), 0.5)  # a 1-channel image is drawn grey
    few = worst_figure([(red, "cat", "dog", 0.9, 0.05)])
    many = worst_figure([(red, "cat", "dog", 0.9, 0.05)] * 3 + [(grey, "fox", "cat", 0.8, 0.1)] * 2)
    assert few.dtype == np.uint8 and few.ndim == 3 and few.shape[2] == 3
    # Five tiles: two rows of four columns; the red tiles fill a visible share, the grey ones too.
    assert many.shape[1] > few.shape[1] and many.shape[0] > few.shape[0]
    assert _share(many, (255, 0, 0)) > 0.05 and _share(many, (128, 128, 128)) > 0.03
    # Captions are dark red text above the tiles, not over them: the tile rows stay pure red.
    rows = np.where(_match(few, (255, 0, 0)).mean(axis=1) > 0.2)[0]
    assert rows.size > 0
    text = _match(few, (139, 0, 0), tol=40)
    assert text[: rows.min()].any() and not text[rows.min(): rows.max() + 1].any()
    # Small images are enlarged by whole pixels (24 -> a multiple of 24), so the captions fit above them.
    red_cols = np.where(_match(few, (255, 0, 0)).any(axis=0))[0]
    assert (red_cols.max() - red_cols.min() + 1) % 24 == 0 and rows.size % 24 == 0


def test_confusion_figure_colours_rows_by_share_and_writes_counts() -> None:
    cm = np.array([[30, 0, 0], [0, 10, 10], [0, 0, 0]])  # class 1 is half wrong, class 2 has no images
    image = confusion_figure(cm, ["cat", "dog", "fox"])
    assert image.dtype == np.uint8 and image.shape[2] == 3
    navy = _match(image, NAVY, tol=4)  # share 1.0: cell (0, 0), and the top of the colour bar
    ys, xs = np.nonzero(navy)
    assert navy.sum() > 40 * 40
    half = _blues_at(0.5)
    assert _match(image, half, tol=4).sum() > 2 * 40 * 40  # cells (1, 1) and (1, 2)
    # The count 30 is written in white inside the navy cell.
    top, left = ys.min(), xs.min()
    cell = image[top: top + 48, left: left + 48]
    assert _match(cell, (255, 255, 255), tol=30).any()


def _blues_at(share: float) -> tuple[int, int, int]:
    from ftlab.eval_report import _blues

    return tuple(int(v) for v in _blues(np.array([share]))[0])


def test_confusion_figure_with_many_classes_stays_bounded() -> None:
    n = 300
    cm = np.eye(n, dtype=int) * 3
    image = confusion_figure(cm, [f"class_{i}" for i in range(n)])
    assert max(image.shape[:2]) < 1200
    assert _match(image, NAVY, tol=4).sum() >= n  # every diagonal cell still drawn


def test_per_class_figure_bar_lengths_follow_accuracy() -> None:
    acc = np.array([1.0, 0.5, np.nan])
    support = np.array([10, 4, 0])
    image = per_class_figure(acc, support, ["cat", "dog", "fox"])
    bar = _match(image, BAR, tol=4)
    rows = [r for r in range(image.shape[0]) if bar[r].sum() > 0]
    assert rows
    lengths = sorted({int(bar[r].sum()) for r in rows})
    # Two bar lengths, one twice the other (within a pixel); the class without images has no bar.
    assert len(lengths) == 2 and abs(lengths[1] - 2 * lengths[0]) <= 2
    assert abs(lengths[1] - 400) <= 2
