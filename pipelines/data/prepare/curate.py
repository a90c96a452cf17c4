"""Curation columns (`sora data prepare --curate`): scene cuts, a motion score and perceptual hashes per clip.

    cuts = detect_cuts("video.mp4", fps)            # [120, 348]: first frames of new scenes (plan stage)
    columns = clip_columns(pixels)                  # {"motion": (K,), "phash": (K, 3)} of decoded clips (decode stage)

Scene cuts are found once per source file, in the plan stage that already holds the file, so a clip is planned
inside one scene (a clip that would span a cut starts at the cut instead) and records its scene's index.
Motion and hashes are computed from the pixels the decode stage has anyway: nothing is decoded twice.
`sora data filter` (pipelines/data/filter.py) reads these columns to subset a dataset without decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CURATE_COLUMNS = ("scene", "motion", "phash")
"""Shard columns a curated run adds, after the format's own (options.COLUMNS)."""
CURATE_DTYPES = {"scene": "int32", "motion": "float32", "phash": "3 x int64"}
SCENE_DETECTOR = "scenedetect AdaptiveDetector"
SCENE_THRESHOLD = 3.0
"""AdaptiveDetector's adaptive_threshold (its default): a frame's content change over the rolling average of its
neighbours'. It tells a hard cut from fast motion, where a fixed threshold (ContentDetector) cuts on a moving
object in a small frame (measured on the synthetic shapes: a false cut mid-motion at 32 px)."""
MIN_SCENE_S = 0.25
"""Shortest scene, in seconds of source: cuts closer together are flashes, not scenes (scenedetect's default of 15
frames would hide real cuts in clips of 16 frames)."""
SCENE_WINDOW = 2
"""Frames either side of a frame in AdaptiveDetector's rolling average (its default)."""
FLOW_SIDE = 128
"""Short side, in pixels, frames are scaled down to before optical flow: the score is a share of the frame, so it
does not depend on the bucket's resolution, and Farneback on 480x832 would cost more than decoding the clip."""
MOTION = "mean Farneback optical-flow magnitude between consecutive clip frames, in % of the frame's short side"
HASH_FRAMES = 3
"""Frames hashed per clip (first, middle, last): one frame cannot tell a shape moving left from one moving right."""
PHASH = f"imagehash.phash (64 bits) of {HASH_FRAMES} frames (first, middle, last) at the bucket's resolution"
DEFAULT_MAX_HAMMING = 4
"""Near-duplicate: every hashed frame within this many of 64 bits (re-encodes and small crops stay within ~4;
different scenes differ by ~32)."""


def detect_cuts(local: str, fps: float) -> list[int]:
    """Source frame numbers that start a new scene (sorted; [] for one scene), read with PyAV, streaming."""
    from scenedetect import AdaptiveDetector, SceneManager, open_video

    video = open_video(local, backend="pyav")
    manager = SceneManager()
    manager.add_detector(
        AdaptiveDetector(
            adaptive_threshold=SCENE_THRESHOLD,
            window_width=SCENE_WINDOW,
            min_scene_len=max(1, round(MIN_SCENE_S * fps)),
        )
    )
    manager.detect_scenes(video, show_progress=False)
    return sorted(int(start.frame_num) for start, _ in manager.get_scene_list() if int(start.frame_num) > 0)


def scene_of(cuts: list[int], first: int) -> int:
    """Index of the scene holding source frame `first`."""
    return int(np.searchsorted(np.asarray(cuts, dtype=np.int64), first, side="right"))


def spanned_cut(cuts: list[int], indices: list[int]) -> int | None:
    """The first cut inside a clip's source frames (a cut c starts frame c: spanned when first < c <= last)."""
    return next((c for c in cuts if indices[0] < c <= indices[-1]), None)


def motion_score(frames: np.ndarray) -> float:
    """(F, H, W, 3) uint8 -> the clip's motion (see MOTION); 0 for a one-frame clip."""
    import cv2

    if len(frames) < 2:
        return 0.0
    h, w = frames.shape[1:3]
    scale = min(1.0, FLOW_SIDE / min(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames]
    mags = []
    for a, b in zip(gray, gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)  # (h, w, 2) pixels
        mags.append(float(np.linalg.norm(flow, axis=2).mean()))
    return 100.0 * float(np.mean(mags)) / min(size)


def frame_hashes(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (HASH_FRAMES,) int64 perceptual hashes (the 64 bits, reinterpreted as signed)."""
    import imagehash
    from PIL import Image

    picks = np.linspace(0, len(frames) - 1, HASH_FRAMES).round().astype(int)
    bits = [int(str(imagehash.phash(Image.fromarray(frames[i]))), 16) for i in picks]
    return np.asarray(bits, dtype=np.uint64).view(np.int64)


def clip_columns(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """(K, F, H, W, 3) uint8 decoded clips -> {"motion": (K,) float32, "phash": (K, HASH_FRAMES) int64}."""
    motion = np.asarray([motion_score(c) for c in pixels], dtype=np.float32)
    hashes = np.stack([frame_hashes(c) for c in pixels]) if len(pixels) else np.zeros((0, HASH_FRAMES), np.int64)
    return {"motion": motion, "phash": hashes}


def append_clip_columns(rows: Any, pixels: np.ndarray) -> Any:
    """Plan rows (Arrow) of decoded clips + their pixels -> the rows with `motion` and `phash` appended."""
    import pyarrow as pa

    cols = clip_columns(pixels)
    hashes = pa.FixedSizeListArray.from_arrays(pa.array(cols["phash"].reshape(-1), pa.int64()), HASH_FRAMES)
    return rows.append_column("motion", pa.array(cols["motion"], pa.float32())).append_column("phash", hashes)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between int64 hashes, elementwise."""
    x = np.bitwise_xor(a.view(np.uint64), b.view(np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)
