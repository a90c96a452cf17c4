"""Read colour, shape and motion direction back from a clip of the synthetic shapes dataset.

The detector is plain image analysis, no learned weights, so the number it gives is the same on any
machine and can be checked against ground truth (`sora data synth` clips score ~100%):

1. Foreground: a pixel's brightness is its largest channel (pure blue is as "on" as white), and a
   pixel is foreground when it is brighter than half the clip's peak brightness. Half the peak puts
   the boundary where an anti-aliased edge is half covered, so thresholded areas match true areas,
   and it adapts to generated clips that are dimmer than 255.
2. Colour: the mean foreground RGB, divided by its largest channel, against the grammar's palette
   divided likewise (nearest). Normalising removes brightness, and averaging over every foreground
   pixel of every frame washes out H.264's 4:2:0 chroma smear at the edges and the blur of
   generated clips.
3. Shape: from luma (H.264 keeps it at full resolution; chroma is halved). Per frame, the largest
   connected blob's soft coverage (luma / the foreground's luma peak) gives its area;
   its width and height are the sums of the per-column and per-row maximum coverage (sub-pixel
   exact for an axis-aligned box). fill = area / (width * height) is 1 for a square, pi/4 for a
   circle and 1/2 for a triangle; the triangle (apex up) also has its centroid 1/6 of its height
   below its box centre. The median features over frames pick the nearest prototype, and that
   settles a triangle. Square against circle is settled by fit instead: a generated square's edge is
   ragged, and one pixel standing out of an edge widens the box by a whole pixel (8 px squares then
   fill 0.8, a circle's value), where it moves a fitted outline by a fraction. Per frame, the ideal
   square and the ideal circle of the blob's area, centred on its centroid and blurred as much as
   fits best (generated edges are soft), are compared with the blob's soft coverage by IoU; the
   median IoU over frames picks the one that fits better.
4. Direction: the blob's centroid per frame, a Theil-Sen (median of pairwise slopes) line through
   x(t) and y(t): robust to a few frames where a generated blob splits or fades. The axis with the
   larger displacement and its sign give left/right/up/down (y grows downwards).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from pipelines.data import grammar
from pipelines.data.synth import SUPERSAMPLE, shape_mask

FOREGROUND_FRACTION = 0.5
"""Foreground = brighter than this share of the clip's peak brightness (half coverage of an edge pixel)."""
MIN_PEAK = 32
"""A clip whose brightest pixel is below this (of 255) holds no shape at all: nothing is detected."""
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    # (fill of the bounding box, centroid offset below the box centre / box height) of the ideal shapes.
    "square": (1.0, 0.0),
    "circle": (math.pi / 4, 0.0),
    "triangle": (0.5, 1 / 6),
}
ASYMMETRY_WEIGHT = 2.0
"""Scale of the centroid-offset feature against fill: the triangle's 1/6 offset then counts about as
much as its fill gap to the circle, so either cue alone can identify it."""
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
"""BT.601 luma, the full-resolution plane of H.264's 4:2:0 video."""
OUTLINE_BLURS = (0.0, 0.4, 0.7, 1.0)
"""Gaussian blurs (pixels) tried on each ideal outline when fitting it to a blob; the best fit counts."""
MIN_BLOB_PIXELS = 3
"""Frames whose largest blob is smaller than this say nothing reliable about shape or position."""
_PALETTE_NAMES = tuple(grammar.COLORS)
_PALETTE = np.asarray([grammar.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_PALETTE = _PALETTE / _PALETTE.max(axis=1, keepdims=True)  # (K, 3), each colour's largest channel 1


@dataclass
class Detection:
    """What the detector read from one clip; a field is None when the clip holds no shape."""

    color: str | None
    shape: str | None
    direction: str | None
    confidence: float
    """The smallest of the three per-attribute confidences, in [0, 1]."""
    color_confidence: float = 0.0
    shape_confidence: float = 0.0
    direction_confidence: float = 0.0
    fill: float | None = None
    """Median fill of the bounding box over frames (1 square, pi/4 circle, 1/2 triangle)."""
    displacement: tuple[float, float] | None = None
    """(dx, dy) pixels the centroid moved from the first frame to the last, by the robust fit."""

    def attributes(self) -> dict[str, str | None]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction}

    def to_dict(self) -> dict:
        return asdict(self)


def _margin_confidence(distances: np.ndarray) -> float:
    """1 - nearest / second nearest: 1 when exactly on a prototype, 0 when halfway between two."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    return float(1.0 - d[0] / d[1]) if d[1] > 0 else 0.0


def _theil_sen_slope(t: np.ndarray, v: np.ndarray) -> float:
    """Median of pairwise slopes: a line fit that ignores up to ~29% outlying frames."""
    i, j = np.triu_indices(len(t), k=1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i])))


def _color(frames: np.ndarray, fg: np.ndarray) -> tuple[str, float]:
    mean = frames[fg].mean(axis=0)  # (3,)
    mean = mean / max(mean.max(), 1e-6)
    d = np.linalg.norm(_PALETTE - mean[None], axis=1)  # (K,)
    return _PALETTE_NAMES[int(np.argmin(d))], _margin_confidence(d)


def _outline_fit(c: np.ndarray, shape: str, cx: float, cy: float) -> float:
    """IoU of a blob's soft coverage `c` (H, W) with the ideal `shape` of the same area centred on (cx, cy)."""
    area = float(c.sum())
    side = math.sqrt(area) if shape == "square" else math.sqrt(4 * area / math.pi)  # the box's side
    # Only a window around the blob: the ideal outline, its blur and the blob all lie inside it.
    reach = side / 2 + 4.0  # half the box, plus 4 px for the widest blur and the blob's ragged rim
    y0, x0 = max(0, int(cy - reach)), max(0, int(cx - reach))
    c = c[y0 : int(cy + reach) + 2, x0 : int(cx + reach) + 2]
    h, w = c.shape
    ys = (np.arange(h * SUPERSAMPLE) + 0.5) / SUPERSAMPLE + y0  # sub-pixel sample positions; pixel i spans [i, i + 1)
    xs = (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE + x0
    inside = shape_mask(shape, xs[None, :] - (cx + 0.5 - side / 2), ys[:, None] - (cy + 0.5 - side / 2), side)
    ideal = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    best = 0.0
    for sigma in OUTLINE_BLURS:
        q = ndimage.gaussian_filter(ideal, sigma) if sigma else ideal
        best = max(best, float(np.minimum(c, q).sum() / np.maximum(c, q).sum()))
    return best


def _blob_features(cover: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, float, float, float] | None:
    """(fill, centroid offset / height, centroid x, centroid y, square fit, circle fit) of the largest blob of
    one frame."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    if sizes[k - 1] < MIN_BLOB_PIXELS:
        return None
    # Soft coverage inside the blob, dilated by one pixel so the anti-aliased rim counts too.
    region = ndimage.binary_dilation(labels == k)
    c = np.where(region, cover, 0.0)  # (H, W)
    area = c.sum()
    width, height = c.max(axis=0).sum(), c.max(axis=1).sum()
    if area <= 0 or width <= 0 or height <= 0:
        return None
    ys, xs = np.nonzero(c)
    w = c[ys, xs]
    cx, cy = float((xs * w).sum() / area), float((ys * w).sum() / area)
    # Box top from the row profile: the first row with any coverage, less its uncovered share.
    rows = c.max(axis=1)
    top = np.nonzero(rows)[0][0] + (1.0 - rows[np.nonzero(rows)[0][0]])
    offset = (cy + 0.5 - (top + height / 2)) / height
    fits = (_outline_fit(c, "square", cx, cy), _outline_fit(c, "circle", cx, cy))
    return float(area / (width * height)), float(offset), cx, cy, *fits


def detect(clip: np.ndarray) -> Detection:
    """Colour, shape and direction of the one shape in a (T, H, W, 3) uint8 clip."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip must be (T, H, W, 3), got shape {tuple(clip.shape)}")
    frames = clip.astype(np.float64)  # (T, H, W, 3)
    bright = frames.max(axis=-1)  # (T, H, W)
    peak = float(np.percentile(bright, 99.9))
    if peak < MIN_PEAK:
        return Detection(None, None, None, 0.0)
    fg = bright > FOREGROUND_FRACTION * peak  # (T, H, W)
    if not fg.any():
        return Detection(None, None, None, 0.0)
    color, color_conf = _color(frames, fg)

    # Geometry from luma: H.264 keeps it at full resolution while chroma is halved both ways, and a
    # small blue or red shape is mostly chroma in `bright`.
    luma = frames @ LUMA_WEIGHTS  # (T, H, W)
    luma_peak = float(np.percentile(luma[fg], 99))
    cover = np.clip(luma / max(luma_peak, 1e-6), 0.0, 1.0)  # (T, H, W) soft coverage
    mask = cover > FOREGROUND_FRACTION
    feats = [(t, f) for t in range(len(clip)) if (f := _blob_features(cover[t], mask[t])) is not None]
    if not feats:
        return Detection(color, None, None, 0.0, color_confidence=color_conf)
    fill = float(np.median([f[0] for _, f in feats]))
    offset = float(np.median([f[1] for _, f in feats]))
    names = list(SHAPE_PROTOTYPES)
    point = np.array([fill, ASYMMETRY_WEIGHT * offset])
    protos = np.array([(f, ASYMMETRY_WEIGHT * o) for f, o in SHAPE_PROTOTYPES.values()])
    d = np.linalg.norm(protos - point[None], axis=1)
    shape, shape_conf = names[int(np.argmin(d))], _margin_confidence(d)
    if shape != "triangle":  # square or circle: the better-fitting outline (1 - IoU as the distance)
        misfit = 1.0 - np.median([(f[4], f[5]) for _, f in feats], axis=0)  # (square, circle)
        shape, shape_conf = ("square", "circle")[int(np.argmin(misfit))], _margin_confidence(misfit)

    direction, direction_conf, disp = None, 0.0, None
    if len(feats) >= 2:
        t = np.array([t for t, _ in feats], dtype=np.float64)
        xy = np.array([(f[2], f[3]) for _, f in feats])  # (N, 2)
        span = len(clip) - 1
        dx, dy = (_theil_sen_slope(t, xy[:, 0]) * span, _theil_sen_slope(t, xy[:, 1]) * span)
        disp = (dx, dy)
        if abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
        # Confident when the motion is clearly along one axis and longer than a pixel.
        direction_conf = float((1.0 - minor / major) * min(1.0, major)) if major > 0 else 0.0
    confidence = min(color_conf, shape_conf, direction_conf)
    return Detection(color, shape, direction, confidence, color_conf, shape_conf, direction_conf, fill, disp)


def _truth(item: str | Mapping[str, str]) -> dict[str, str]:
    """Ground truth from a caption of the grammar or an attributes mapping."""
    if isinstance(item, str):
        parsed = grammar.parse_caption(item)
        if parsed is None:
            raise ValueError(f"'{item}' is not a caption of the grammar '{grammar.CAPTION_TEMPLATE}'")
        return parsed
    missing = [a for a in grammar.ATTRIBUTES if a not in item]
    if missing:
        raise ValueError(f"attributes {dict(item)} lack {', '.join(missing)}")
    return {a: item[a] for a in grammar.ATTRIBUTES}


def score(detections: Sequence[Detection], truths: Sequence[str | Mapping[str, str]]) -> dict[str, float | int]:
    """{color, shape, direction, all, n}: the share of clips whose attribute (all three for `all`) is right."""
    if len(detections) != len(truths):
        raise ValueError(f"got {len(detections)} clips but {len(truths)} captions/attributes")
    n = len(detections)
    if n == 0:
        return {**{a: float("nan") for a in grammar.ATTRIBUTES}, "all": float("nan"), "n": 0}
    right = np.array(
        [[getattr(d, a) == _truth(t)[a] for a in grammar.ATTRIBUTES] for d, t in zip(detections, truths, strict=True)]
    )
    out: dict[str, float | int] = {a: float(right[:, k].mean()) for k, a in enumerate(grammar.ATTRIBUTES)}
    out["all"] = float(right.all(axis=1).mean())
    out["n"] = n
    return out


def attribute_accuracy(
    clips: Sequence[np.ndarray] | np.ndarray, truths: Sequence[str | Mapping[str, str]]
) -> dict[str, float | int]:
    """Detect every clip and score it against its caption or attributes: {color, shape, direction, all, n}."""
    return score([detect(c) for c in clips], truths)
