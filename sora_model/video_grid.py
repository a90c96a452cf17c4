"""Sample sheets: many clips tiled into one video."""

from __future__ import annotations

import math

import numpy as np


def make_grid(videos: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N clips into one: (N, T, H, W, 3) -> (T, rows*(H+pad)+pad, ncols*(W+pad)+pad, 3), black gaps.

    `ncols` defaults to ceil(sqrt(N)), the most square sheet.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[0] < 1:
        raise ValueError(f"videos must be (N, T, H, W, 3) with N >= 1, got shape {tuple(videos.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, t, h, w, _ = videos.shape
    ncols = min(n, ncols or math.ceil(math.sqrt(n)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    grid = np.zeros((t, nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), dtype=videos.dtype)
    for k in range(n):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = videos[k]  # (T, H, W, 3)
    return grid
