"""Decoding clips: frames at the planned indices, resized and centre-cropped to the bucket.

`decode_rows` decodes the clips of a batch of plans, grouped by source (a remote file is fetched once per
batch and removed after); a clip that fails becomes a reject row with the reason and is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S
from pipelines.data.prepare.options import Bucket
from pipelines.data.prepare.storage import LocalFiles, StorageUnavailable


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


def decode_many(clips: list[tuple[str, list[int]]], height: int, width: int, decode: Decoder = decode_frames) -> list[Any]:
    """(local path, frame indices) of a batch's clips, in one call of the decoder child: per clip its frames
    or (class, reason, message)."""
    out: list[Any] = []
    for local, idx in clips:
        try:
            out.append(decode(local, idx, height, width))
        except Exception as err:  # noqa: BLE001 - this clip's failure, handed back
            out.append((type(err), getattr(err, "reason", None), str(err)))
    return out


def decode_rows(rows: list[dict[str, Any]], bucket: Bucket, files: LocalFiles, decode: Decoder = decode_frames,
                decode_timeout_s: float = DECODE_TIMEOUT_S) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """(kept row indices, pixels (K, F, H, W, 3) uint8, reject rows) of plans of one bucket.

    All clips of the batch are decoded in one call of this process's decoder child (`isolate.py`): one
    round trip per batch, not per clip. When that call crashes or times out, the clips are decoded again
    one call each, so only a clip that crashes or hangs the decoder becomes a reject ("decoder crashed" /
    "decoder timed out"). Remote files are fetched for the batch and removed after it."""
    from pipelines.data.prepare.isolate import _restore, isolated
    from pipelines.data.prepare.probe import _reason

    calls = isolated(decode_timeout_s)
    rejects: list[dict[str, Any]] = []
    results: dict[int, Any] = {}
    with contextlib.ExitStack() as stack:
        local_of: dict[str, str] = {}
        for i, r in enumerate(rows):
            if r["source"] not in local_of:
                try:
                    local_of[r["source"]] = stack.enter_context(files.local(r["source"]))
                except StorageUnavailable:
                    raise  # our disk or store failed, not the input: the run stops
                except Exception as err:  # noqa: BLE001 - the file could not be fetched: its clips' reject
                    local_of[r["source"]] = ""
                    results[i] = err
            elif not local_of[r["source"]]:
                results[i] = next(v for j, v in results.items() if rows[j]["source"] == r["source"])
        todo = [i for i in range(len(rows)) if i not in results]
        wanted = [(local_of[rows[i]["source"]], list(rows[i]["indices"])) for i in todo]
        try:
            answers = calls(decode_many, wanted, bucket.height, bucket.width, decode) if todo else []
        except Exception:  # noqa: BLE001 - a crash or hang somewhere in the batch: one clip at a time
            answers = []
            for local, idx in wanted:
                try:
                    answers.append(calls(decode, local, idx, bucket.height, bucket.width))
                except Exception as err:  # noqa: BLE001
                    answers.append(err)
        results.update(zip(todo, answers, strict=True))
    kept = sorted(i for i, res in results.items() if isinstance(res, np.ndarray))
    for i, res in sorted(results.items()):
        if not isinstance(res, np.ndarray):
            err = res if isinstance(res, BaseException) else _restore(*res)
            rejects.extend(_clip_rejects(rows[i], *_reason(err)))
    shape = (0, bucket.frames, bucket.height, bucket.width, 3)
    pixels = np.stack([results[i] for i in kept]) if kept else np.zeros(shape, np.uint8)
    return kept, pixels, rejects


def _clip_rejects(row: dict[str, Any], reason: str, detail: str) -> list[dict[str, Any]]:
    """One reject per manifest line whose caption this clip carried. The clip's id and its line's clip count
    make it a clip-level reject: a resume counts the clip as done, not the line (its other clips may be unwritten)."""
    detail = " ".join(f"clip at {float(row['start_s']):g}s: {detail}".split())
    return [{"line": int(line), "path": row["path"], "source": row["source"], "reason": reason, "detail": detail,
             "clip_id": row["clip_id"], "line_clips": int(n)}
            for line, n in zip(row["lines"], row["line_clips"], strict=True)]  # fmt: skip
