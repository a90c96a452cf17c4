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
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Still images probe and read as one-frame videos (the curriculum's image stage)."""
IMAGE_FPS = 1.0
"""A still is one frame held for one second, so fps and duration stay defined (no division by zero)."""
WRITE_EXTENSIONS = (".mp4", ".gif", ".npz", ".png")
NPZ_KEY = "frames"
"""The array name inside an NPZ, part of the `sora generate --out X.npz` contract."""
MP4_CODEC = "libx264"
MP4_PIX_FMT = "yuv420p"
"""4:2:0 chroma is what every browser and player decodes; it needs even width and height."""
MP4_CRF = "18"
"""x264 quality (lower is better, 23 is its default): small clips stay small, and 18 keeps a
read-back within a few grey levels, which sample sheets and tests rely on."""
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


def _check_file(path: str) -> None:
    """Cheap guards before any decoder sees the path: the C++ readers are the part we cannot interrupt."""
    if not os.path.exists(path):
        raise VideoReadError(path, "missing file")
    if not os.path.isfile(path):
        raise VideoReadError(path, "not a video", "is a directory")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[off : off + len(sig)] == sig for off, sig in _SIGNATURES)


def _open_failure(path: str, err: BaseException) -> VideoReadError:
    """Classify a failure to open: a known container header means damage, anything else is not a video."""
    if _looks_like_container(path):
        return VideoReadError(path, "truncated/undecodable", f"container header present but unreadable: {err}")
    return VideoReadError(path, "not a video", str(err) or type(err).__name__)


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


def _probe_image(path: str) -> VideoInfo:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()  # reads the whole file: catches truncated images cheaply
        with Image.open(path) as img:
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


def _probe_av(path: str) -> VideoInfo:
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _open_failure(path, err) from None
    with container:
        _require_video_stream(path, container)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
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


def _upright(frame: Any) -> np.ndarray:
    """A PyAV frame as (H, W, 3) uint8 RGB the way a player shows it (the display matrix applied)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def probe_video(path: str) -> VideoInfo:
    """Frame count, fps and size of a video (or a still image as one frame).

    decord first (fast, exact frame index); PyAV when decord is not installed or fails on the file,
    so the reason we report comes from the more talkative library.
    """
    path = str(path)
    _check_file(path)
    if _is_image(path):
        return _probe_image(path)
    if _decord() is not None:
        try:
            return _probe_decord(path)
        except Exception:  # decord raises bare RuntimeError/DECORDError; PyAV below says why
            pass
    return _probe_av(path)


PACKET_REORDER_MARGIN = 16
"""Packets past a frame's index that `require_frames_present` also asks for: with B-frames a frame's packet
comes up to a few places after its display index (x264 reorders at most 16)."""


def require_frames_present(path: str, index: int, num_frames: int) -> None:
    """Raise VideoReadError ("truncated/undecodable") unless the file holds the data of frames 0..index.

    Demuxes packets without decoding them (a fraction of a millisecond on a small clip, where decoding
    the frame costs milliseconds), so a file cut after a front index is caught at probe time for the
    price of reading it. A packet that is present but corrupt still fails later, in `read_frames`.
    """
    import av

    path = str(path)
    _check_file(path)
    if _is_image(path):
        _check_indices(path, [index], 1)
        return
    need = min(int(index) + 1 + PACKET_REORDER_MARGIN, int(num_frames))
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _open_failure(path, err) from None
    count = 0
    with container:
        _require_video_stream(path, container)
        try:
            for packet in container.demux(container.streams.video[0]):
                count += bool(packet.size)  # the flush packet at the end is empty
                if count >= need:
                    return
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(path, "truncated/undecodable", f"after packet {count}: {err}") from None
    raise VideoReadError(path, "truncated/undecodable", f"only {count} of {num_frames} frames' data present, frame {index} needed")


def _check_indices(path: str, indices: Sequence[int], num_frames: int) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError(f"no frame indices given for {path}")
    bad = [i for i in idx if i < 0 or i >= num_frames]
    if bad:
        raise ValueError(f"frame index {bad[0]} out of range for {path} with {num_frames} frames")
    return idx


def _read_av(path: str, indices: list[int]) -> np.ndarray:
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
                    frames[count] = _upright(frame)
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
    path = str(path)
    _check_file(path)
    if _is_image(path):
        idx = _check_indices(path, indices, 1)
        return np.repeat(_read_image(path), len(idx), axis=0)  # (N, H, W, 3)
    decord = _decord()
    reader = None
    if decord is not None:
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECORD_THREADS)
        except Exception:  # decord cannot open it: PyAV below decodes it or says precisely why not
            reader = None
    if reader is not None:
        idx = _check_indices(path, indices, len(reader))
        try:
            return np.ascontiguousarray(_to_numpy(reader.get_batch(idx)), dtype=np.uint8)  # (N, H, W, 3)
        except Exception:  # e.g. truncated after a front index: PyAV finds how far the file goes
            pass
    return _read_av(path, _check_indices(path, indices, _MAX_INDEX))


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


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}; convert with autoencoder.model_to_pixels")
    return np.ascontiguousarray(frames)


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    import av

    t, h, w, _ = frames.shape
    # yuv420p subsamples chroma 2x2, so odd sizes are padded by repeating the last row/column.
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
    # faststart puts the index first, so HTTP clients can play the file while it downloads.
    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as container:
        # Same frames must give the same bytes (the server's result cache and the synth tests rely on it). x264's
        # macroblock-tree rate control reads uninitialised memory on tiny frames (32x32 gave 5 different files in 100
        # encodes of one clip; 64x64 and up did not), and threaded lookahead depends on timing, so both are off.
        # PyAV's codec context defaults to thread_count=0 (auto), which overrides a "threads" option, so it is set here.
        stream = container.add_stream(MP4_CODEC, rate=rate, options={"crf": MP4_CRF, "x264-params": "mbtree=0"})
        stream.codec_context.thread_count = 1
        stream.width, stream.height, stream.pix_fmt = w + pw, h + ph, MP4_PIX_FMT
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's lookahead
            container.mux(packet)


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    # GIF delays are in centiseconds; PIL takes ms. loop=0 repeats forever.
    duration = max(10, int(round(1000.0 / fps)))
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)


def _write_png(path: str, frames: np.ndarray) -> None:
    from PIL import Image

    if frames.shape[0] == 1:
        sheet = frames[0]
    else:  # contact sheet: every frame side by side, reading order
        sheet = make_grid(frames[:, None], pad=1)[0]  # (H', W', 3)
    Image.fromarray(sheet).save(path, format="PNG")


def write_video(path: str, frames: np.ndarray, fps: float = 8) -> str:
    """Write (T, H, W, 3) uint8 frames; the format follows the extension. Returns the path.

    .mp4: H.264 yuv420p (odd sizes padded by one edge row/column). .gif: animated, looping.
    .npz: key 'frames', exact. .png: the frame itself when T == 1, else a contact sheet of all frames
    (pass `frames[:1]` for a thumbnail). The file appears atomically (written aside, then renamed),
    so a server never hands out half a video.
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"unsupported video extension '{ext}' for {path}; use one of {', '.join(WRITE_EXTENSIONS)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = _check_frames(frames)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=folder)
    os.close(fd)  # written by name: MP4 faststart reopens the file to move its index to the front
    try:
        if ext == ".mp4":
            _write_mp4(tmp, frames, fps)
        elif ext == ".gif":
            _write_gif(tmp, frames, fps)
        elif ext == ".npz":
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **{NPZ_KEY: frames})
        else:
            _write_png(tmp, frames)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def make_grid(videos: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N clips into one: (N, T, H, W, 3) -> (T, rows*(H+pad)+pad, ncols*(W+pad)+pad, 3), black gaps.

    `ncols` defaults to ceil(sqrt(N)), the most square sheet.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[0] < 1:
        raise ValueError(f"videos must be (N, T, H, W, 3) with N >= 1, got shape {tuple(videos.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, t, h, w, _ = videos.shape
    ncols = min(n, ncols or math.ceil(math.sqrt(n)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    grid = np.zeros((t, nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), dtype=videos.dtype)
    for k in range(n):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = videos[k]  # (T, H, W, 3)
    return grid
