"""Decoding clips at the bucket's size ÷ decoding at the source's size then resizing, 1080p -> 256x256.

What is compared, on one 1920x1080 H.264 MP4 made here (moving gradients and a disc, libx264 CRF 18 as
`write_video` writes; no download), several 16-frame clips of the same video, all decoded to a 256x256 bucket:
- before: what `decode_frames` did until issue 31: a decord reader per clip at the source's size, then
  `resize_center_crop` (PIL antialiased bicubic over the centre box);
- after: `decode_clips`: one reader for all the video's clips, opened at `cover_size` (455x256: FFmpeg scales
  each frame as it is decoded), then a centre crop.
The details also time one reader at the source's size then resize, so the gain of each part shows. The value is
the median of per-round ratios before ÷ after (rounds interleaved, wall clock, one decoder thread as the pipeline
runs). The decoded pixels agree within tests/unit/test_video_target.py's tolerance; the benchmark checks the mean
|difference| too and reports it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved, main, median, paired_ratio, summary

FIGURE = "decode_at_target_speedup"
GOAL = (">=", 2.0)
SOURCE = (1080, 1920)
BUCKET = (256, 256)
CLIP_FRAMES = 16


def _write_1080p(path: str, frames: int) -> None:
    from sora_model.video import write_video

    h, w = SOURCE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = 128 + 100 * np.cos(yy / 90.0)
    video = np.empty((frames, h, w, 3), np.uint8)
    for i in range(frames):
        r = 128 + 100 * np.sin((xx + 12 * i) / 160.0)
        disc = ((xx - 400 - 30 * i) ** 2 + (yy - 540) ** 2) < 200.0**2
        b = np.where(disc, 230.0, 40.0 + 60 * np.sin(xx * yy / 5e4))
        video[i] = np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
    write_video(path, video, fps=24)


def run(quick: bool) -> dict:
    from pipelines.data.prepare.decode import decode_clips, resize_center_crop
    from sora_model.video import read_clips, read_frames

    n_clips = 3 if quick else 4
    total = n_clips * CLIP_FRAMES + 8
    clips = [list(range(k * CLIP_FRAMES + 2, (k + 1) * CLIP_FRAMES + 2)) for k in range(n_clips)]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "src_1080p.mp4")
        _write_1080p(path, total)

        def before() -> list[np.ndarray]:
            return [resize_center_crop(read_frames(path, c), *BUCKET) for c in clips]

        def one_reader_source() -> list[np.ndarray]:
            return [resize_center_crop(f, *BUCKET) for f in read_clips(path, clips)]

        def after() -> list[np.ndarray]:
            return decode_clips(path, clips, *BUCKET)

        mad = float(np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(after(), before(), strict=True)]))
        assert mad < 4.0, f"decode at target differs from decode then resize by {mad:.2f} grey levels"
        times = interleaved(
            {"before": before, "one_reader_source": one_reader_source, "after": after}, reps=3 if quick else 5
        )
    return {
        "value": round(paired_ratio(times["before"], times["after"]), 3),
        "compared": (
            f"{n_clips} clips x {CLIP_FRAMES} frames of one 1920x1080 H.264 video to a {BUCKET[0]}x{BUCKET[1]} bucket: "
            "a reader per clip at the source's size then PIL resize+crop ÷ one reader decoding at the resize size "
            "(decord width/height) then crop; wall clock, interleaved"
        ),
        "details": {
            "seconds": {k: summary(v) for k, v in times.items()},
            "one_reader_alone_speedup": round(paired_ratio(times["before"], times["one_reader_source"]), 3),
            "clips_per_s_after": round(n_clips / median(times["after"]), 2),
            "mean_abs_diff_grey_levels": round(mad, 3),
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
