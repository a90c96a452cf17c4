"""Sample sheets a person can read: each clip labelled with its prompt, held-out prompts marked, and what the
judge (`sora eval`'s attribute detector) read, in red where it differs from what was asked.

    sheet = labelled_sheet(clips, prompts, held_out=flags, judged=judge(clips))
    # sheet: (H, W, 3), rows = prompts, frames across
    grid = labelled_grid(clips, prompts, held_out=flags, judged=judge(clips))    # (T, H, W, 3): tiles, animated

Used by the demo's report (samples.png, samples.gif) and by training's stage-end grids (RUN/samples/<stage>.gif).
Text is drawn with PIL's default font (no font files to ship).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PROMPT_COLOR = (235, 235, 235)
HELD_OUT_COLOR = (255, 190, 60)
WRONG_COLOR = (255, 80, 80)
RIGHT_COLOR = (110, 210, 110)
BACKGROUND = (24, 24, 24)
FONT_SIZE = 11
LINE_H = 14
PAD = 2
MIN_JUDGED_FRAMES = 4
"""Fewer frames than this show no motion to judge: such grids (the images stage) are labelled, not judged."""


def judge(clips: np.ndarray) -> list[dict[str, str | None]]:
    """What the attribute detector reads from each clip: {color, shape, direction} (None where it found nothing)."""
    from pipelines.evaluate.attributes import detect

    return [detect(c).attributes() for c in np.asarray(clips)]


def asked(prompt: str) -> dict[str, str] | None:
    from pipelines.data import grammar

    return grammar.parse_caption(prompt)


def verdict(prompt: str, judged: dict[str, str | None] | None) -> tuple[str, tuple[int, int, int]] | None:
    """The judge's line for a clip and its colour: red naming what it read when that differs, else green."""
    want = asked(prompt)
    if judged is None or want is None:
        return None
    if all(judged.get(k) == v for k, v in want.items()):
        return "judged: as asked", RIGHT_COLOR
    read = " ".join(judged.get(k) or "?" for k in ("color", "shape", "direction"))
    return f"judged: {read}", WRONG_COLOR


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1: a scalable default
    except TypeError:
        return ImageFont.load_default()


def _label_lines(prompt: str, held_out: bool, judged: dict | None) -> list[tuple[str, tuple[int, int, int]]]:
    lines = [(prompt, PROMPT_COLOR)]
    if held_out:
        lines.append(("held out of training", HELD_OUT_COLOR))
    v = verdict(prompt, judged)
    if v is not None:
        lines.append(v)
    return lines


def _draw(canvas: np.ndarray, xy: tuple[int, int], lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(img), _font()
    x, y = xy
    for text, color in lines:
        draw.text((x, y), text, fill=color, font=font)
        y += LINE_H
    return np.asarray(img)


def _text_width(lines: Sequence[str]) -> int:
    font = _font()
    return max((int(math.ceil(font.getlength(t))) for t in lines), default=0)


def _flags(n: int, held_out: Sequence[bool] | None, judged: Sequence[dict | None] | None) -> tuple[list[bool], list]:
    return list(held_out or [False] * n), list(judged if judged is not None else [None] * n)


def labelled_sheet(
    clips: np.ndarray,
    prompts: Sequence[str],
    held_out: Sequence[bool] | None = None,
    judged: Sequence[dict | None] | None = None,
    scale: int = 4,
) -> np.ndarray:
    """One still image: a row per clip, its label on the left, its frames left to right.
    (N, T, H, W, 3) -> (H', W', 3)."""
    clips = np.asarray(clips)
    n, t, h, w, _ = clips.shape
    held, judged = _flags(n, held_out, judged)
    big = clips.repeat(scale, axis=2).repeat(scale, axis=3)  # (N, T, sH, sW, 3)
    labels = [_label_lines(p, held[i], judged[i]) for i, p in enumerate(prompts)]
    label_w = _text_width([text for ls in labels for text, _ in ls]) + 12
    row_h = max(h * scale, LINE_H * 3 + 6) + PAD
    sheet = np.zeros((n * row_h + PAD, label_w + t * (w * scale + PAD) + PAD, 3), dtype=np.uint8)
    sheet[:] = BACKGROUND
    for i in range(n):
        y = PAD + i * row_h
        for j in range(t):
            x = label_w + j * (w * scale + PAD)
            sheet[y : y + h * scale, x : x + w * scale] = big[i, j]  # (sH, sW, 3)
    for i in range(n):
        sheet = _draw(sheet, (6, PAD + i * row_h + 2), labels[i])
    return sheet


def labelled_grid(
    clips: np.ndarray,
    prompts: Sequence[str],
    held_out: Sequence[bool] | None = None,
    judged: Sequence[dict | None] | None = None,
    scale: int = 4,
    ncols: int | None = None,
) -> np.ndarray:
    """Animated tiles, each clip under its label: (N, T, H, W, 3) -> (T, H', W', 3)."""
    clips = np.asarray(clips)
    n, t, h, w, _ = clips.shape
    held, judged = _flags(n, held_out, judged)
    big = clips.repeat(scale, axis=2).repeat(scale, axis=3)  # (N, T, sH, sW, 3)
    labels = [_label_lines(p, held[i], judged[i]) for i, p in enumerate(prompts)]
    tile_w = max(w * scale, _text_width([text for ls in labels for text, _ in ls]) + 8)
    label_h = LINE_H * max(len(ls) for ls in labels) + 4
    tile_h = label_h + h * scale
    ncols = min(n, ncols or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    still = np.zeros((nrows * (tile_h + PAD) + PAD, ncols * (tile_w + PAD) + PAD, 3), dtype=np.uint8)
    still[:] = BACKGROUND
    for k in range(n):
        r, c = divmod(k, ncols)
        still = _draw(still, (PAD + c * (tile_w + PAD) + 4, PAD + r * (tile_h + PAD) + 2), labels[k])
    grid = np.repeat(still[None], t, axis=0)  # (T, H', W', 3)
    for k in range(n):
        r, c = divmod(k, ncols)
        y, x = PAD + r * (tile_h + PAD) + label_h, PAD + c * (tile_w + PAD)
        grid[:, y : y + h * scale, x : x + w * scale] = big[k]  # (T, sH, sW, 3)
    return grid


def stage_grid(clips: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Training's stage-end grid: labelled, and judged when the clips are long enough to show motion."""
    clips = np.asarray(clips)
    judged = judge(clips) if clips.shape[1] >= MIN_JUDGED_FRAMES else None
    scale = max(1, 64 // max(clips.shape[2], 1))  # small clips upscaled to ~64 px so the labels fit beside them
    return labelled_grid(clips, prompts, judged=judged, scale=scale)
