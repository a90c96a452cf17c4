"""The synthetic dataset's caption grammar: the one place its words and colours are defined.

`sora data synth` renders from these constants and the evaluator's attribute detector classifies
generated clips against them, so a colour added here is both generated and detected.

    a {color} {shape} moving {direction}
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable

CAPTION_TEMPLATE = "a {color} {shape} moving {direction}"

COLORS: dict[str, tuple[int, int, int]] = {
    # Saturated primaries and secondaries only: they stay far apart after H.264's 4:2:0 chroma
    # subsampling and quantisation, so a detector can tell them apart in decoded (or generated) clips.
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    # (dx, dy) in image coordinates: y grows downwards, so "up" is -y.
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction")
"""Keys of a row's `attributes`, in caption order."""

Combination = tuple[str, str, str]
"""(color, shape, direction)."""


def caption(color: str, shape: str, direction: str) -> str:
    """The caption of one combination; raises ValueError for a word outside the grammar."""
    for word, vocab, name in ((color, COLORS, "color"), (shape, SHAPES, "shape"), (direction, DIRECTIONS, "direction")):
        if word not in vocab:
            raise ValueError(f"unknown {name} '{word}'; choose one of: {', '.join(vocab)}")
    return CAPTION_TEMPLATE.format(color=color, shape=shape, direction=direction)


def parse_caption(text: str) -> dict[str, str] | None:
    """{'color', 'shape', 'direction'} of a grammar caption, or None when `text` is not one."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        return None
    color, shape, direction = words[1], words[2], words[4]
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        return None
    return {"color": color, "shape": shape, "direction": direction}


def all_combinations() -> list[Combination]:
    """Every (color, shape, direction), in a cycling order: consecutive combinations change all three
    attributes, so the first few videos of a small dataset already cover every colour, shape and direction.

    Video i takes (COLORS[i % 7], SHAPES[i % 3], DIRECTIONS[i % 4]); 7, 3 and 4 are pairwise coprime, so by
    the Chinese remainder theorem the first 84 indices visit all 84 combinations exactly once.
    """
    colors = list(COLORS)
    seen: dict[Combination, None] = {}
    for i in range(len(colors) * len(SHAPES) * len(DIRECTIONS)):
        seen.setdefault((colors[i % len(colors)], SHAPES[i % len(SHAPES)], DIRECTIONS[i % len(DIRECTIONS)]), None)
    for combo in itertools.product(colors, SHAPES, DIRECTIONS):  # only matters if the sizes stop being coprime
        seen.setdefault(combo, None)
    return list(seen)


def parse_pattern(text: str) -> Combination:
    """'red circle left', 'a red circle moving left' or with `*` wildcards ('* circle *', 'red * *').

    Raises ValueError naming the word that is neither in the grammar nor a wildcard pattern.
    """
    words = [w for w in text.strip().lower().split() if w not in ("a", "moving")]
    if len(words) != 3:
        raise ValueError(f"--exclude '{text}' must be three words COLOR SHAPE DIRECTION (use * for any)")
    for word, vocab, name in zip(words, (list(COLORS), SHAPES, DIRECTIONS), ATTRIBUTES, strict=True):
        if not any(fnmatch.fnmatchcase(v, word) for v in vocab):
            raise ValueError(f"--exclude '{text}': {name} '{word}' matches none of: {', '.join(vocab)}")
    return (words[0], words[1], words[2])


def matches(combo: Combination, pattern: Combination) -> bool:
    return all(fnmatch.fnmatchcase(value, pat) for value, pat in zip(combo, pattern, strict=True))


def combinations(exclude: Iterable[str] = ()) -> list[Combination]:
    """`all_combinations()` minus those matching any `exclude` pattern; ValueError if none are left."""
    patterns = [parse_pattern(p) for p in exclude]
    kept = [c for c in all_combinations() if not any(matches(c, p) for p in patterns)]
    if not kept:
        raise ValueError("--exclude leaves no combination to generate")
    return kept
