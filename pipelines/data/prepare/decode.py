"""Decoding clips: frames at the planned indices, resized and centre-cropped to the bucket.

`decode_rows` decodes the clips of a batch of plans, grouped by source (a remote file is fetched once per
batch and removed after); a clip that fails becomes a reject row with the reason and is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S
from pipelines.data.prepare.options import Bucket
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


Decoder = Callable[[str, list[int], int, int], np.ndarray]
"""(local path, frame indices, height, width) -> (F, height, width, 3) uint8."""


def decode_frames(local: str, indices: list[int], height: int, width: int) -> np.ndarray:
    """The in-process decoder: read the frames, resize and crop them."""
    from sora_model.video import read_frames

    return resize_center_crop(read_frames(local, indices), height, width)


def decode_many(local: str, indices: list[list[int]], height: int, width: int, decode: Decoder = decode_frames) -> list[Any]:
    """Clips of one file, in one call of the decoder child: per clip its frames or (class, reason, message)."""
    out: list[Any] = []
    for idx in indices:
        try:
            out.append(decode(local, idx, height, width))
        except Exception as err:  # noqa: BLE001 - this clip's failure, handed back
            out.append((type(err), getattr(err, "reason", None), str(err)))
    return out


def decode_rows(rows: list[dict[str, Any]], bucket: Bucket, files: LocalFiles, decode: Decoder = decode_frames,
                decode_timeout_s: float = DECODE_TIMEOUT_S) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """(kept row indices, pixels (K, F, H, W, 3) uint8, reject rows) of plans of one bucket.

    The clips of each file are decoded in one call of this process's decoder child (`isolate.py`). When
    that call crashes or times out, the file's clips are decoded again one call each, so only the clip
    that crashes or hangs the decoder becomes a reject ("decoder crashed" / "decoder timed out")."""
    from pipelines.data.prepare.isolate import _restore, isolated
    from pipelines.data.prepare.probe import _reason

    calls = isolated(decode_timeout_s)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r["source"], []).append(i)
    got: dict[int, np.ndarray] = {}
    rejects = []
    for source, idx in by_source.items():
        try:
            with files.local(source) as local:
                wanted = [list(rows[i]["indices"]) for i in idx]
                try:
                    results = calls(decode_many, local, wanted, bucket.height, bucket.width, decode)
                except Exception:  # noqa: BLE001 - crash or hang somewhere in the file: one clip at a time
                    results = []
                    for w in wanted:
                        try:
                            results.append(calls(decode, local, w, bucket.height, bucket.width))
                        except Exception as err:  # noqa: BLE001
                            results.append(err)
                for i, res in zip(idx, results, strict=True):
                    if isinstance(res, np.ndarray):
                        got[i] = res
                    else:
                        err = res if isinstance(res, BaseException) else _restore(*res)
                        rejects.extend(_clip_rejects(rows[i], *_reason(err)))
        except Exception as err:  # noqa: BLE001 - the file could not be fetched
            rejects.extend(r for i in idx if i not in got for r in _clip_rejects(rows[i], *_reason(err)))
    kept = sorted(got)
    shape = (0, bucket.frames, bucket.height, bucket.width, 3)
    pixels = np.stack([got[i] for i in kept]) if kept else np.zeros(shape, np.uint8)
    return kept, pixels, rejects


def _clip_rejects(row: dict[str, Any], reason: str, detail: str) -> list[dict[str, Any]]:
    """One reject per manifest line whose caption this clip carried."""
    detail = " ".join(f"clip at {float(row['start_s']):g}s: {detail}".split())
    return [{"line": int(line), "path": row["path"], "source": row["source"], "reason": reason, "detail": detail}
            for line in row["lines"]]  # fmt: skip
