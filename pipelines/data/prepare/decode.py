"""Decoding clips: frames at the planned indices, resized and centre-cropped to the bucket."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np

from pipelines.data.prepare.options import _VIDEO_ERROR_REASONS, Bucket
from pipelines.data.prepare.storage import LocalFiles


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8: scale the short side to fit, crop the centre.

    One PIL resize per frame over the centre box (antialiased bicubic when shrinking), so a 1080p frame
    is never upsampled to float in full; a frame already of the target size is returned unchanged.
    """
    from PIL import Image

    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames)
    scale = max(height / h, width / w)
    bh, bw = height / scale, width / scale  # the source box that maps onto the output
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    out = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        img = Image.fromarray(frames[i]).resize((width, height), Image.Resampling.BICUBIC, box=box)
        out[i] = np.asarray(img)
    return out


def _append_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


PLAN_COLUMNS = ("clip_id", "source", "start_s", "fps", "caption", "line", "path")


class DecodeClips:
    """Ray Data actor: clip plans -> (B, F, H, W, 3) uint8 `pixels`, resized and centre-cropped to the bucket.

    A clip that fails here (a file changed since probing, a corrupt frame past the probed one) is
    appended to OUT/_rejects/ by this actor and dropped; the run goes on.
    """

    def __init__(self, bucket: Bucket, rejects_dir: str):
        self.bucket = bucket
        self.rejects_path = os.path.join(rejects_dir, f"decode-{uuid.uuid4().hex}.jsonl")
        self.files = LocalFiles()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sora_model.video import VideoReadError, read_frames

        b = self.bucket
        keep, clips, rejects = [], [], []
        for i in range(len(batch["clip_id"])):
            source = str(batch["source"][i])
            try:
                frames = read_frames(self.files.get(source), [int(x) for x in batch["indices"][i]])
                clips.append(resize_center_crop(frames, b.height, b.width))  # (F, H, W, 3)
                keep.append(i)
            except (VideoReadError, ValueError, RuntimeError) as err:
                reason = _VIDEO_ERROR_REASONS.get(getattr(err, "reason", ""), "unreadable")
                rejects.append(
                    {
                        "line": int(batch["line"][i]),
                        "path": str(batch["path"][i]),
                        "source": source,
                        "reason": reason,
                        "detail": " ".join(f"clip at {float(batch['start_s'][i]):g}s: {err}".split()),
                    }
                )
        if rejects:
            _append_jsonl(self.rejects_path, rejects)
        out = {k: np.asarray(batch[k])[keep] for k in PLAN_COLUMNS}
        out["pixels"] = np.stack(clips) if clips else np.zeros((0, b.frames, b.height, b.width, 3), np.uint8)
        return out
