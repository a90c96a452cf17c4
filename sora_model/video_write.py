"""Writing clips: MP4 (H.264), GIF, NPZ and PNG frames, atomically (a temporary file renamed into place)."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from sora_model.video_grid import make_grid

WRITE_EXTENSIONS = (".mp4", ".gif", ".npz", ".png")
NPZ_KEY = "frames"
"""The array name inside an NPZ, part of the `sora generate --out X.npz` contract."""
MP4_CODEC = "libx264"
MP4_PIX_FMT = "yuv420p"
"""4:2:0 chroma is what every browser and player decodes; it needs even width and height."""
MP4_CRF = "18"
"""x264 quality (lower is better, 23 is its default): small clips stay small, and 18 keeps a
read-back within a few grey levels, which sample sheets and tests rely on."""


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
