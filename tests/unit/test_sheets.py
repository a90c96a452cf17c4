"""Sample sheets label each clip with its prompt, mark held-out prompts, and mark what the judge read wrong."""

from __future__ import annotations

import numpy as np

from pipelines.data.synth import SynthSpec, make_video
from pipelines.sheets import HELD_OUT_COLOR, RIGHT_COLOR, WRONG_COLOR, judge, labelled_grid, labelled_sheet, verdict

PROMPTS = ["a red circle moving left", "a blue square moving up", "a yellow triangle moving right"]
DRAWN = [("red", "circle", "left"), ("blue", "square", "up"), ("green", "triangle", "down")]  # the last is drawn wrong


def clips() -> np.ndarray:
    spec = SynthSpec(size=32, frames=8)
    return np.stack([make_video(spec, i, c) for i, c in enumerate(DRAWN)])  # (3, 8, 32, 32, 3)


def has_color(region: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool((np.abs(region.astype(int) - np.array(color)).sum(-1) < 60).any())


def test_the_judge_reads_the_clips_and_says_what_differs():
    judged = judge(clips())
    assert judged[0] == {"color": "red", "shape": "circle", "direction": "left"}
    assert verdict(PROMPTS[0], judged[0])[1] == RIGHT_COLOR
    text, color = verdict(PROMPTS[2], judged[2])
    assert color == WRONG_COLOR and text == "judged: green triangle down"
    assert verdict("a photo of a cat", judged[0]) is None  # outside the grammar: nothing to judge against


def test_sheet_rows_carry_their_labels():
    c = clips()
    sheet = labelled_sheet(c, PROMPTS, held_out=[False, False, True], judged=judge(c), scale=4)
    n, t = c.shape[:2]
    row_h = (sheet.shape[0] - 2) // n
    label_w = sheet.shape[1] - 2 - t * (32 * 4 + 2)
    labels = [sheet[2 + i * row_h : 2 + (i + 1) * row_h, :label_w] for i in range(n)]
    assert all(has_color(lab, (235, 235, 235)) for lab in labels)  # every row has its prompt
    assert has_color(labels[2], HELD_OUT_COLOR) and not has_color(labels[0], HELD_OUT_COLOR)
    assert has_color(labels[2], WRONG_COLOR) and not has_color(labels[0], WRONG_COLOR)
    assert has_color(labels[0], RIGHT_COLOR)
    # the frames themselves are untouched: the first row's first frame is the clip, upscaled
    assert np.array_equal(sheet[2 : 2 + 128, label_w : label_w + 128], c[0, 0].repeat(4, 0).repeat(4, 1))


def test_animated_grid_keeps_every_frame_and_labels_each_tile():
    c = clips()
    grid = labelled_grid(c, PROMPTS, held_out=[False, False, True], judged=judge(c), scale=2)
    assert grid.shape[0] == c.shape[1] and grid.dtype == np.uint8
    assert has_color(grid[0], WRONG_COLOR) and has_color(grid[-1], HELD_OUT_COLOR)
    assert not np.array_equal(grid[0], grid[-1])  # the clips move
