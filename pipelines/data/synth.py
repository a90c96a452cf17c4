r"""`sora data synth`: the embedded default dataset of coloured shapes moving on black.

    sora data synth --out data/shapes --num-videos 168 [--size 32] [--frames 16] [--fps 8] [--seed 0] \
        [--exclude "red circle left" --exclude "* triangle up"]
    ray job submit --working-dir . -- python -m pipelines.data.synth --out /mnt/data/shapes --num-videos 10000

Writes DIR/videos/NNNN.mp4 (H.264) and DIR/captions.jsonl, one row per video:
    {"path": "videos/0000.mp4", "caption": "a red circle moving left",
     "attributes": {"color": "red", "shape": "circle", "direction": "left"}}
which is also a manifest `sora data prepare` reads as is. Captions follow `grammar.py` exactly.

Video i shows combination i of `grammar.combinations(exclude)` (cycled), so N = 84 k videos cover every
combination k times and smaller N still spread over all colours, shapes and directions. Start positions
come from a generator seeded by (seed, i): the output does not depend on how the work is split across
Ray tasks. Every video has the same shape size and speed; the shape stays fully inside the frame.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data import grammar

SHAPE_FRACTION = 3 / 8
"""Shape extent as a fraction of the frame: 12 px at 32 px, large enough that 4:2:0 chroma keeps its colour."""
MIN_EXTENT = 4
TRAVEL_FRACTION = 0.75
"""Share of the free space (frame - shape) the shape crosses in one video: a clear motion that still
leaves room for a random start, so clips do not all begin at the same spot."""
SUPERSAMPLE = 4
"""Render at 4x and average: edges get partial coverage, so sub-pixel motion is smooth instead of jumping."""
VIDEOS_PER_TASK = 16
"""Videos rendered by one Ray task; encoding one 32x32 clip takes a few ms, so smaller tasks are all overhead."""
CAPTIONS_FILE = "captions.jsonl"
VIDEOS_DIR = "videos"


@dataclass(frozen=True)
class SynthSpec:
    size: int = 32
    frames: int = 16
    fps: float = 8
    seed: int = 0

    @property
    def extent(self) -> int:
        return max(MIN_EXTENT, round(self.size * SHAPE_FRACTION))

    @property
    def travel(self) -> float:
        """Pixels travelled from the first frame to the last."""
        return (self.size - self.extent) * TRAVEL_FRACTION if self.frames > 1 else 0.0

    @property
    def speed(self) -> float:
        """Pixels per frame, the same for every video of a dataset."""
        return self.travel / (self.frames - 1) if self.frames > 1 else 0.0


def trajectory(spec: SynthSpec, direction: str, rng: np.random.Generator) -> np.ndarray:
    """(T, 2) float top-left corners (x, y) of the shape's box, moving at constant speed, never leaving the frame."""
    free = spec.size - spec.extent  # the box's corner may range over [0, free]
    dx, dy = grammar.DIRECTION_VECTORS[direction]
    along0 = rng.uniform(0.0, free - spec.travel)  # start so that the whole path fits
    across = rng.uniform(0.0, free)
    steps = np.arange(spec.frames, dtype=np.float64) * spec.speed
    if dx:
        x = along0 + steps if dx > 0 else free - along0 - steps
        y = np.full(spec.frames, across)
    else:
        y = along0 + steps if dy > 0 else free - along0 - steps
        x = np.full(spec.frames, across)
    return np.stack([x, y], axis=1)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, extent: float) -> np.ndarray:
    """Inside-test at points (u, v) relative to the box's top-left corner."""
    if shape == "square":
        return (u >= 0) & (u <= extent) & (v >= 0) & (v <= extent)
    if shape == "circle":
        r = extent / 2
        return (u - r) ** 2 + (v - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base along the bottom edge
        return (v >= 0) & (v <= extent) & (np.abs(u - extent / 2) <= v / 2)
    raise ValueError(f"unknown shape '{shape}'; choose one of: {', '.join(grammar.SHAPES)}")


def render(spec: SynthSpec, color: str, shape: str, corners: np.ndarray) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of `shape` filled with `color` at each corner, on BACKGROUND."""
    s = SUPERSAMPLE
    centres = (np.arange(spec.size * s) + 0.5) / s  # sub-pixel sample positions in pixel units
    rgb = np.asarray(grammar.COLORS[color], dtype=np.float32)
    bg = np.asarray(grammar.BACKGROUND, dtype=np.float32)
    frames = np.empty((len(corners), spec.size, spec.size, 3), dtype=np.uint8)
    for t, (x0, y0) in enumerate(corners):
        inside = shape_mask(shape, centres[None, :] - x0, centres[:, None] - y0, spec.extent)  # (H*s, W*s)
        cover = inside.reshape(spec.size, s, spec.size, s).mean(axis=(1, 3), dtype=np.float32)  # (H, W)
        frames[t] = np.rint(bg + cover[..., None] * (rgb - bg)).astype(np.uint8)  # (H, W, 3)
    return frames


def make_video(spec: SynthSpec, index: int, combo: grammar.Combination) -> np.ndarray:
    """Video `index` of the dataset: deterministic in (spec, index, combo) alone."""
    color, shape, direction = combo
    rng = np.random.default_rng([spec.seed, index])
    return render(spec, color, shape, trajectory(spec, direction, rng))


def _render_chunk(out: str, spec: SynthSpec, items: list[tuple[int, grammar.Combination]]) -> list[dict]:
    from sora_model.video import write_video

    rows = []
    for index, combo in items:
        rel = f"{VIDEOS_DIR}/{index:04d}.mp4"
        write_video(os.path.join(out, rel), make_video(spec, index, combo), fps=spec.fps)
        rows.append(
            {
                "path": rel,
                "caption": grammar.caption(*combo),
                "attributes": dict(zip(grammar.ATTRIBUTES, combo, strict=True)),
            }
        )
    return rows


def synth(
    out: str,
    num_videos: int,
    size: int = 32,
    frames: int = 16,
    fps: float = 8,
    seed: int = 0,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Render the dataset with Ray tasks; returns the path of captions.jsonl."""
    import ray
    from tqdm import tqdm

    from pipelines.data.runtime import ensure_ray

    if num_videos < 1:
        raise ValueError(f"--num-videos must be >= 1, got {num_videos}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if fps <= 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    spec = SynthSpec(size=size, frames=frames, fps=fps, seed=seed)
    if size < 2 * MIN_EXTENT or size % 2:
        raise ValueError(
            f"--size must be an even number >= {2 * MIN_EXTENT} (H.264 4:2:0 needs even sizes), got {size}"
        )
    combos = grammar.combinations(exclude)
    items = [(i, combos[i % len(combos)]) for i in range(num_videos)]

    out_dir = Path(out)
    (out_dir / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    ensure_ray()
    render_chunk = ray.remote(num_cpus=1)(_render_chunk)
    spec_ref = ray.put(spec)
    chunks = [items[i : i + VIDEOS_PER_TASK] for i in range(0, len(items), VIDEOS_PER_TASK)]
    pending = {render_chunk.remote(str(out_dir.resolve()), spec_ref, chunk): k for k, chunk in enumerate(chunks)}
    results: dict[int, list[dict]] = {}
    with tqdm(total=num_videos, unit="video", desc="synth", disable=not progress, file=sys.stderr) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            results[k] = ray.get(done[0])
            bar.update(len(results[k]))

    manifest = out_dir / CAPTIONS_FILE
    tmp = manifest.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for k in range(len(chunks)):
            for row in results[k]:
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, manifest)
    repeats = math.ceil(num_videos / len(combos))
    print(
        f"{num_videos} videos ({len(combos)} combinations, up to {repeats} each) written to {out_dir}/{VIDEOS_DIR}; "
        f"captions in {manifest}"
    )
    return manifest


if __name__ == "__main__":
    # The CLI's parser and one-line errors; imported here only, so this module never imports the CLI.
    from pipelines.cli import main

    sys.exit(main(["data", "synth", *sys.argv[1:]]))
