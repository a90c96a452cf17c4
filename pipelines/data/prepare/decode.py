"""Decoding clips: frames at the planned indices, decoded at the bucket's resize size and centre-cropped.

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


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) -> (T, height, width, 3): the centre box, whole pixels (h >= height, w >= width)."""
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def fit_decoded(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames decoded at `cover_size` -> the bucket: a centre crop, as `resize_center_crop` would have cut
    after its resize; any other size (a source smaller than the bucket) goes through `resize_center_crop`."""
    h, w = frames.shape[1:3]
    if h >= height and w >= width and (h == height or w == width):
        return center_crop(frames, height, width)
    return resize_center_crop(frames, height, width)


Decoder = Callable[[str, list[int], int, int], np.ndarray]
"""(local path, frame indices, height, width) -> (F, height, width, 3) uint8."""


def decode_clips(local: str, clips: list[list[int]], height: int, width: int) -> list[np.ndarray]:
    """All clips of one video from one open reader, decoded at the size the bucket's aspect-kept resize would
    produce (FFmpeg scales each frame as it is decoded, so no source-size RGB frame is made), then centre-cropped.
    Pixels stay within a few grey levels of `resize_center_crop` on source-size frames
    (tests/unit/test_video_target.py)."""
    from sora_model.video import read_clips

    return [fit_decoded(f, height, width) for f in read_clips(local, clips, cover=(height, width))]


def decode_frames(local: str, indices: list[int], height: int, width: int) -> np.ndarray:
    """The in-process decoder of one clip: `decode_clips` of a single clip."""
    return decode_clips(local, [indices], height, width)[0]


_ONE_READER: dict[Callable[..., Any], Callable[..., list[np.ndarray]]] = {decode_frames: decode_clips}
"""Decoders with a form that decodes all clips of a video from one reader."""


def decode_many(
    clips: list[tuple[str, list[int]]], height: int, width: int, decode: Decoder = decode_frames
) -> list[Any]:
    """(local path, frame indices) of a batch's clips, in one call of the decoder child: per clip its frames
    or (class, reason, message). The clips of one video share one reader when the decoder has a one-reader form;
    if that fails, its clips are decoded one by one so each gets its own answer."""
    out: list[Any] = [None] * len(clips)
    by_video: dict[str, list[int]] = {}
    for k, (local, _) in enumerate(clips):
        by_video.setdefault(local, []).append(k)
    together = _ONE_READER.get(decode)
    for local, ks in by_video.items():
        if together is not None and len(ks) > 1:
            try:
                for k, frames in zip(ks, together(local, [clips[k][1] for k in ks], height, width), strict=True):
                    out[k] = frames
                continue
            except Exception:  # noqa: BLE001 - one clip is bad: each clip alone below, for its own reason
                pass
        for k in ks:
            try:
                out[k] = decode(local, clips[k][1], height, width)
            except Exception as err:  # noqa: BLE001 - this clip's failure, handed back
                out[k] = (type(err), getattr(err, "reason", None), str(err))
    return out


def decode_rows(
    rows: list[dict[str, Any]],
    bucket: Bucket,
    files: LocalFiles,
    decode: Decoder = decode_frames,
    decode_timeout_s: float = DECODE_TIMEOUT_S,
) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:
    """(kept row indices, pixels (K, F, H, W, 3) uint8, reject rows) of plans of one bucket.

    All clips of the batch are decoded in one call of this process's decoder child (`isolate.py`): one
    round trip per batch, not per clip. When that call crashes or times out, the clips are decoded again
    one call each, so only a clip that crashes or hangs the decoder becomes a reject ("decoder crashed" /
    "decoder timed out"). Remote files are fetched for the batch and removed after it."""
    from pipelines.data.prepare.isolate import _restore, isolated
    from pipelines.data.prepare.reasons import reject_reason

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
            rejects.extend(_clip_rejects(rows[i], *reject_reason(err)))
    shape = (0, bucket.frames, bucket.height, bucket.width, 3)
    pixels = np.stack([results[i] for i in kept]) if kept else np.zeros(shape, np.uint8)
    return kept, pixels, rejects


def _clip_rejects(row: dict[str, Any], reason: str, detail: str) -> list[dict[str, Any]]:
    """One reject per manifest line whose caption this clip carried. The clip's id and its line's clip count
    make it a clip-level reject: a resume counts the clip as done, not the line (its other clips may be unwritten)."""
    detail = " ".join(f"clip at {float(row['start_s']):g}s: {detail}".split())
    return [
        {
            "line": int(line),
            "path": row["path"],
            "source": row["source"],
            "reason": reason,
            "detail": detail,
            "clip_id": row["clip_id"],
            "line_clips": int(n),
        }
        for line, n in zip(row["lines"], row["line_clips"], strict=True)
    ]
