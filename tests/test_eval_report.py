"""The worst-mistakes figure of the test stage: one mosaic, every image and caption in it."""

from __future__ import annotations

import numpy as np

from ftlab.eval_report import worst_figure


def _share(rgb: np.ndarray, colour: tuple[int, int, int]) -> float:
    return float(np.all(np.abs(rgb.astype(int) - np.array(colour)) < 8, axis=-1).mean())


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
    rows = np.where(np.all(np.abs(few.astype(int) - [255, 0, 0]) < 8, axis=-1).mean(axis=1) > 0.3)[0]
    assert rows.size > 0
    text = np.all(np.abs(few.astype(int) - [139, 0, 0]) < 40, axis=-1)
    assert text[: rows.min()].any() and not text[rows.min(): rows.max() + 1].any()
