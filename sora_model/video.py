"""Video I/O: probe, read (decord, PyAV fallback) and write (MP4/GIF/NPZ/PNG).

Frames are always numpy uint8 arrays in (T, H, W, 3) RGB order at this boundary; the model side
converts with :func:`sora_model.autoencoder.pixels_to_model`.

Broken inputs never crash the caller: every failure to read becomes a :class:`VideoReadError` whose
message is one line, starting with a fixed reason ("missing file", "empty file", "not a video",
"truncated/undecodable", "no video stream") so the data pipeline can count rejects by reason.

Behaviour checked on this stack (decord 0.6, PyAV 18, FFmpeg 7): on zero-byte files, random bytes,
text renamed to .mp4, missing paths and MP4s cut before their `moov` atom, decord raises a
RuntimeError at open and PyAV raises InvalidDataError; neither hangs or segfaults. MP4s cut after a
front `moov` (faststart) open fine and report their full frame count from the index, then fail when
a frame past the cut is decoded, so probing alone cannot prove a file complete: `read_frames`
reports the failure as "truncated/undecodable". We still check existence and size ourselves before
handing a path to decord, because its C++ reader is the part we cannot interrupt.

Rotation: phones store portrait video as landscape frames plus a display matrix. Frames and sizes here are
always as a player shows them: decord 0.6 applies the matrix itself (checked for 90, -90, 180 and 270 in
tests/unit/test_video.py), and the PyAV path turns each frame by `VideoFrame.rotation`.

Remote files: `probe_video` and `video_presence.require_frames_present` also take an open binary file (readable,
seekable; e.g. a reader of an object store's byte ranges). They then read only what FFmpeg asks for: the container's
header and index, the first frame, and the packets around the last frame needed (by seeking), not the whole file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sora_model.video_grid import make_grid  # noqa: F401 - re-exported from its old home
from sora_model.video_write import (  # noqa: F401 - ditto
    MP4_CODEC,
    MP4_CRF,
    MP4_PIX_FMT,
    NPZ_KEY,
    WRITE_EXTENSIONS,
    write_video,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Still images probe and read as one-frame videos (the curriculum's image stage)."""
IMAGE_FPS = 1.0
"""A still is one frame held for one second, so fps and duration stay defined (no division by zero)."""
DECORD_THREADS = 1
"""Decoder threads per open file. Parallelism comes from decoding many files at once (Ray gives each
task one CPU); FFmpeg's own threads (0 = one per core) oversubscribe those CPUs and, on short clips,
cost more to start than they save: opening and decoding 16 frames of a 64x64 clip took 3.3 ms with
0 and 1.8 ms with 1 on a 2-core machine."""
_MAX_INDEX = 2**31
"""Upper bound for index checks when only decoding can tell the frame count (PyAV path)."""

# File signatures of the containers we expect, to tell "a damaged video" from "not a video at all".
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM (EBML)
    (0, b"RIFF"),  # AVI
    (0, b"OggS"),
    (0, b"FLV"),
    (0, b"GIF8"),
    (0, b"\x00\x00\x01\xba"),  # MPEG program stream
    (0, b"\x00\x00\x01\xb3"),
)


class VideoReadError(ValueError):
    """A video could not be used; `reason` is one of the fixed reasons, the message is one line."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        detail = " ".join(str(detail).split())  # one line, whatever FFmpeg printed
        super().__init__(f"{reason}: {detail} ({self.path})" if detail else f"{reason} ({self.path})")


@dataclass
class VideoInfo:
    """What a probe learns without decoding the whole file."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    """Seconds: num_frames / fps, so sampling arithmetic agrees with the frame count."""


# ---------------------------------------------------------------------------------------------
# Probing and reading
# ---------------------------------------------------------------------------------------------


Source = str | BinaryIO
"""A local path, or an open binary file (readable, seekable) whose `name` is used in messages."""


def _name(source: Source) -> str:
    return source if isinstance(source, str) else str(getattr(source, "name", "<stream>"))


def _check_file(path: Source) -> None:
    """Cheap guards before any decoder sees the path: the C++ readers are the part we cannot interrupt."""
    if not isinstance(path, str):
        if path.seek(0, os.SEEK_END) == 0:
            raise VideoReadError(_name(path), "empty file")
        path.seek(0)
        return
    if not os.path.exists(path):
        raise VideoReadError(path, "missing file")
    if not os.path.isfile(path):
        raise VideoReadError(path, "not a video", "is a directory")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _looks_like_container(path: Source) -> bool:
    if isinstance(path, str):
        with open(path, "rb") as f:
            head = f.read(16)
    else:
        path.seek(0)
        head = path.read(16)
    return any(head[off : off + len(sig)] == sig for off, sig in _SIGNATURES)


def _open_failure(path: Source, err: BaseException) -> VideoReadError:
    """Classify a failure to open: a known container header means damage, anything else is not a video."""
    if _looks_like_container(path):
        return VideoReadError(_name(path), "truncated/undecodable", f"container header present but unreadable: {err}")
    return VideoReadError(_name(path), "not a video", str(err) or type(err).__name__)


def _open_av(source: Source) -> Any:
    """av.open of a path or of an open file (from its start)."""
    import av

    if not isinstance(source, str):
        source.seek(0)
    try:
        return av.open(source)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _open_failure(source, err) from None


def _require_video_stream(path: str, container: Any) -> None:
    if not container.streams.video:
        if not container.streams:  # a header and nothing after it: cut off, not an audio-only file
            raise VideoReadError(path, "truncated/undecodable", "container holds no streams")
        raise VideoReadError(path, "no video stream", f"streams: {', '.join(s.type for s in container.streams)}")


def _decord() -> Any | None:
    try:
        import decord
    except ImportError:  # not built for this platform (e.g. aarch64, macOS arm)
        return None
    return decord


def _to_numpy(batch: Any) -> np.ndarray:
    """decord returns its own NDArray, or a torch tensor if someone set the torch bridge globally."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):
        return batch.cpu().numpy()
    return np.asarray(batch)


def _image_error(path: str, err: Exception) -> VideoReadError:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # no image header at all
        return VideoReadError(path, "not a video", "not a readable image")
    return VideoReadError(path, "truncated/undecodable", str(err))


def _probe_image(source: Source) -> VideoInfo:
    from PIL import Image

    path = _name(source)
    try:
        for verify in (True, False):
            if not isinstance(source, str):
                source.seek(0)
            with Image.open(source) as img:
                if verify:
                    img.verify()  # reads the whole file: catches truncated images cheaply
                width, height = img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise _image_error(path, err) from None
    return VideoInfo(path, 1, IMAGE_FPS, width, height, 1.0 / IMAGE_FPS)


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)[None]  # (1, H, W, 3)
    except (OSError, SyntaxError, ValueError) as err:
        raise _image_error(path, err) from None


def _probe_decord(path: str) -> VideoInfo:
    decord = _decord()
    assert decord is not None
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECORD_THREADS)
    n = len(vr)
    fps = float(vr.get_avg_fps())
    if n < 1 or not fps > 0:
        raise RuntimeError(f"decord reports {n} frames at {fps} fps")
    height, width = vr[0].shape[:2]  # decoding frame 0 also proves the stream is decodable at all
    return VideoInfo(path, n, fps, int(width), int(height), n / fps)


@contextmanager
def _video_stream(source: Source) -> Iterator[tuple[str, Any, Any, Any]]:
    """(name, open container, its first video stream, that stream's frame rate or None) of a path or open file;
    the container is closed after."""
    path = _name(source)
    container = _open_av(source)
    with container:
        _require_video_stream(path, container)
        stream = container.streams.video[0]
        yield path, container, stream, stream.average_rate or stream.guessed_rate


def _probe_av(source: Source) -> VideoInfo:
    import av

    with _video_stream(source) as (path, container, stream, rate):
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if n == 0 and stream.duration is not None and stream.time_base and fps > 0:
            n = int(round(float(stream.duration * stream.time_base) * fps))
        if n == 0:
            # WebM/MKV and raw streams carry no frame count: count packets (demux only, no decode).
            n = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(path, "truncated/undecodable", str(err)) from None
        if first is None or n < 1:
            raise VideoReadError(path, "truncated/undecodable", "no decodable frame")
        if not fps > 0:
            raise VideoReadError(path, "truncated/undecodable", "no frame rate in the stream")
        width, height = (first.height, first.width) if _quarter_turns(first) % 2 else (first.width, first.height)
        return VideoInfo(path, n, fps, int(width), int(height), n / fps)


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns that show a decoded frame upright: the display matrix a phone writes
    (FFmpeg's side data; PyAV's `VideoFrame.rotation`, degrees counter-clockwise). Mirroring is not applied."""
    return int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4


def cover_size(height: int, width: int, cover: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a (height, width) frame scaled down, aspect kept, to the smallest size that still covers the
    `cover` box (h, w); the frame's own size when it is no larger or `cover` is None (never upscaled)."""
    if cover is None:
        return height, width
    scale = max(cover[0] / height, cover[1] / width)
    if scale >= 1:
        return height, width
    return max(cover[0], round(height * scale)), max(cover[1], round(width * scale))


def _upright(frame: Any, cover: tuple[int, int] | None = None) -> np.ndarray:
    """A PyAV frame as (H, W, 3) uint8 RGB the way a player shows it (the display matrix applied), scaled by
    FFmpeg's swscale (bicubic) to `cover_size` of its upright size when `cover` is given."""
    turns = _quarter_turns(frame)
    h, w = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)  # upright
    dh, dw = cover_size(h, w, cover)
    if (dh, dw) == (h, w):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        sh, sw = (dw, dh) if turns % 2 else (dh, dw)  # the stored orientation
        rgb = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="BICUBIC")
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def probe_video(path: Source) -> VideoInfo:
    """Frame count, fps and size of a video (or a still image as one frame).

    decord first (fast, exact frame index); PyAV when decord is not installed or fails on the file,
    so the reason we report comes from the more talkative library. An open file (`Source`) goes to PyAV,
    which reads only the ranges it needs (decord would read the whole file into memory first).
    """
    path = path if not isinstance(path, os.PathLike) else str(path)
    _check_file(path)
    if _is_image(_name(path)):
        return _probe_image(path)
    if not isinstance(path, str):
        return _probe_av(path)
    if _decord() is not None:
        try:
            return _probe_decord(path)
        except Exception:  # decord raises bare RuntimeError/DECORDError; PyAV below says why
            pass
    return _probe_av(path)


def _check_indices(path: str, indices: Sequence[int], num_frames: int) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError(f"no frame indices given for {path}")
    bad = [i for i in idx if i < 0 or i >= num_frames]
    if bad:
        raise ValueError(f"frame index {bad[0]} out of range for {path} with {num_frames} frames")
    return idx


def _read_av(path: str, indices: list[int], cover: tuple[int, int] | None = None) -> np.ndarray:
    """Sequential decode keeping the wanted frames: slower than decord's seeking, but exact."""
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _open_failure(path, err) from None
    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    with container:
        _require_video_stream(path, container)
        stream = container.streams.video[0]
        if stream.frames:  # the index knows the count: an index past it is the caller's mistake
            _check_indices(path, indices, int(stream.frames))
        stream.thread_type = "AUTO"
        count = 0
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    frames[count] = _upright(frame, cover)
                count += 1
                if count > last:
                    break
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(path, "truncated/undecodable", f"after frame {count}: {err}") from None
    if len(frames) < len(wanted):
        raise VideoReadError(path, "truncated/undecodable", f"only {count} frames decoded, frame {last} requested")
    return np.stack([frames[i] for i in indices])  # (N, H, W, 3)


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Exactly the frames at `indices` (any order, repeats allowed): (len(indices), H, W, 3) uint8."""
    return read_clips(path, [indices])[0]


def _scaled_size(path: str, cover: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) decord should decode `path` at for `cover`, or None: no smaller size, or a rotated video (decord
    0.6 scales those in the stored orientation and returns them unturned, or with 6 channels)."""
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0))  # one frame: its size and display matrix
    if _quarter_turns(frame):
        return None
    size = cover_size(frame.height, frame.width, cover)
    return None if size == (frame.height, frame.width) else size


def _open_decord(path: str, cover: tuple[int, int] | None) -> Any | None:
    """A decord reader decoding at `_scaled_size` (FFmpeg scales each frame as it is decoded) when `cover` is
    given and that applies, else at the source's size; None when decord is missing or cannot open the file."""
    decord = _decord()
    if decord is None:
        return None
    try:
        size = _scaled_size(path, cover) if cover is not None else None
        if size is not None:
            scaled = decord.VideoReader(
                path, ctx=decord.cpu(0), width=size[1], height=size[0], num_threads=DECORD_THREADS
            )
            if scaled[0].shape == (*size, 3):
                return scaled
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECORD_THREADS)
    except Exception:  # decord cannot open it: PyAV below decodes it or says precisely why not
        return None


def read_clips(path: str, clips: Sequence[Sequence[int]], cover: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Each clip's frames at its indices, (len(clip), H, W, 3) uint8, from ONE open reader of the video.

    With `cover` = (h, w) the frames are decoded already scaled to `cover_size` (the smallest aspect-kept size
    covering the box; never upscaled), not at the source's size: FFmpeg's scaler runs on each decoded
    frame, so a 1080p source never exists as full-size RGB; a file decord can only read unscaled comes at its own
    size (resize it). Raises on the first failure, like `read_frames`."""
    path = str(path)
    _check_file(path)
    if _is_image(path):
        still = _read_image(path)
        return [np.repeat(still, len(_check_indices(path, c, 1)), axis=0) for c in clips]  # (N, H, W, 3)
    # decord's scaled reader, on a file with a damaged GOP, now and then fails a clip past the damage (7 in 300
    # tries on tests/integration/test_prepare_resume.py's video) that a plain reader decodes (0 in 500): then
    # the frames come at the source's size, as before, and the caller resizes them.
    for size in dict.fromkeys([cover, None]):
        reader = _open_decord(path, size)
        if reader is None:
            continue
        idx = [_check_indices(path, c, len(reader)) for c in clips]
        try:
            return [np.ascontiguousarray(_to_numpy(reader.get_batch(i)), dtype=np.uint8) for i in idx]  # (N, H, W, 3)
        except Exception:  # e.g. truncated after a front index: PyAV finds how far the file goes
            pass
    idx = [_check_indices(path, c, _MAX_INDEX) for c in clips]
    union = sorted({i for c in idx for i in c})
    frames = dict(zip(union, _read_av(path, union, cover), strict=True))  # one sequential pass for all clips
    return [np.stack([frames[i] for i in c]) for c in idx]


def sample_indices(info: VideoInfo, num_frames: int, fps: float | None, start_s: float) -> list[int]:
    """Source frame indices for a clip of `num_frames` starting at `start_s`, resampled to `fps`.

    Frame i of the clip shows time start_s + i / fps and takes the nearest source frame; `fps=None`
    keeps the source rate (consecutive frames). Raises ValueError when the clip runs past the end.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    step = 1.0 if fps is None else info.fps / fps  # source frames per clip frame
    first = start_s * info.fps
    # floor(x + 0.5) rounds halves up, where Python's round() would alternate (banker's rounding).
    indices = [int(math.floor(first + i * step + 0.5)) for i in range(num_frames)]
    if indices[-1] >= info.num_frames:
        rate = "source fps" if fps is None else f"{fps:g} fps"
        need = start_s + (num_frames - 1) * step / info.fps
        raise ValueError(
            f"clip of {num_frames} frames at {rate} from {start_s:g}s needs {need:.3f}s but "
            f"{info.path} has {info.duration:.3f}s ({info.num_frames} frames at {info.fps:g} fps)"
        )
    return indices


def _frames_that_fit(info: VideoInfo, fps: float | None, start_s: float) -> int:
    step = 1.0 if fps is None else info.fps / fps
    first = start_s * info.fps
    # Largest count whose last index, floor(first + (n-1) step + 0.5), stays <= num_frames - 1.
    n = int(math.floor((info.num_frames - 0.5 - first) / step)) + 1
    while n > 0 and math.floor(first + (n - 1) * step + 0.5) > info.num_frames - 1:
        n -= 1  # float round-off at the boundary
    if n < 1:
        raise ValueError(f"start_s {start_s:g}s is past the end of {info.path} ({info.duration:.3f}s)")
    return n


def read_video(path: str, num_frames: int | None = None, fps: float | None = None, start_s: float = 0.0) -> np.ndarray:
    """A clip as (T, H, W, 3) uint8: `num_frames` (all that fit when None) at `fps` (source when None)."""
    info = probe_video(path)
    if num_frames is None:
        num_frames = _frames_that_fit(info, fps, start_s)
    return read_frames(path, sample_indices(info, num_frames, fps, start_s))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
