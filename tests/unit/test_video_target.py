"""Decoding at the bucket's size: one reader per video, frames scaled by FFmpeg as they are decoded, and pixels
within a few grey levels of the old path (decode at the source's size, then PIL resize and centre crop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.data.prepare.decode import decode_clips, decode_many, resize_center_crop
from sora_model import video
from sora_model.video import cover_size, read_clips, read_frames, write_video

TOLERANCE = 4.0
"""Mean |difference| in grey levels (0-255) between decode-at-target and decode-then-resize: swscale's bicubic
(and its chroma upsampling) against PIL's antialiased bicubic, plus a crop offset of at most half a pixel. Measured
1.8-3.1 on these scenes with decord and PyAV; single pixels on the disc's hard edge differ by up to ~95."""


def _scene(t: int, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus a moving disc: the detail a resize must keep, with no per-pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        r = 128 + 100 * np.sin((xx + 4 * i) / (w / 12))
        g = 128 + 100 * np.cos(yy / (h / 9))
        disc = ((xx - w * (0.3 + 0.05 * i)) ** 2 + (yy - h / 2) ** 2) < (h / 5) ** 2
        b = np.where(disc, 230.0, 30.0)
        frames[i] = np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
    return frames


@pytest.fixture(params=["decord", "pyav"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pyav":
        monkeypatch.setattr(video, "_decord", lambda: None)  # as on a platform without decord
    elif video._decord() is None:
        pytest.skip("decord not installed")
    return str(request.param)


def test_cover_size() -> None:
    assert cover_size(1080, 1920, (256, 256)) == (256, 455)
    assert cover_size(1920, 1080, (256, 256)) == (455, 256)
    assert cover_size(480, 832, (240, 240)) == (240, 416)
    assert cover_size(100, 100, (256, 256)) == (100, 100)  # never upscaled
    assert cover_size(100, 200, None) == (100, 200)


@pytest.mark.parametrize(("src", "bucket"), [((180, 320), (64, 64)), ((320, 180), (48, 80)), ((240, 320), (96, 64))])
def test_decode_at_target_matches_decode_then_resize(
    tmp_path: Path, reader: str, src: tuple[int, int], bucket: tuple[int, int]
) -> None:
    path = str(tmp_path / "v.mp4")
    write_video(path, _scene(6, *src), fps=8)
    clips = [[0, 1, 2], [3, 5], [1, 1]]
    got = decode_clips(path, clips, *bucket)
    for idx, frames in zip(clips, got, strict=True):
        old = resize_center_crop(read_frames(path, idx), *bucket)
        assert frames.shape == old.shape == (len(idx), *bucket, 3)
        assert np.abs(frames.astype(int) - old).mean() < TOLERANCE
        shifted = np.roll(old, 3, axis=2)  # a crop 3 pixels off: the tolerance tells it apart
        assert np.abs(frames.astype(int) - shifted).mean() > TOLERANCE


def test_frames_are_decoded_at_the_cover_size(tmp_path: Path, reader: str) -> None:
    path = str(tmp_path / "v.mp4")
    write_video(path, _scene(4, 180, 320), fps=8)
    (a, b) = read_clips(path, [[0, 1], [2]], cover=(64, 64))
    assert a.shape == (2, 64, 114, 3) and b.shape == (1, 64, 114, 3)
    assert read_clips(path, [[0]])[0].shape == (1, 180, 320, 3)


def test_rotated_video_decodes_at_target(tmp_path: Path, reader: str) -> None:
    from test_video import _write_rotated  # tests/unit is on sys.path (pytest prepend mode)

    path = tmp_path / "phone.mp4"
    _write_rotated(path, 90)  # stored 64x32 (W x H), shown 32 wide x 64 high
    # decord 0.6 scales a rotated video unturned: it decodes at the source's size and is resized after; PyAV scales
    (got,) = decode_clips(str(path), [[0, 3]], 32, 16)
    assert got.shape == (2, 32, 16, 3)
    old = resize_center_crop(read_frames(str(path), [0, 3]), 32, 16)
    assert np.abs(got.astype(int) - old).mean() < 8  # H.264 noise on hard edges; a sideways frame is ~100


def test_one_reader_per_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decord = video._decord()
    if decord is None:
        pytest.skip("decord not installed")
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"v{k}.mp4"))
        write_video(paths[-1], _scene(6, 90, 160), fps=8)
    opened: list[str] = []
    real = decord.VideoReader

    def counting(uri: str, *args: object, **kwargs: object) -> object:
        opened.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(decord, "VideoReader", counting)
    clips = [(paths[0], [0, 1]), (paths[1], [0, 1]), (paths[0], [2, 3]), (paths[0], [4, 5]), (paths[1], [2, 3])]
    out = decode_many(clips, 32, 32)
    assert all(isinstance(o, np.ndarray) and o.shape == (2, 32, 32, 3) for o in out)
    # per video one reader, at the scaled size, whatever the number of clips (before: one per clip)
    assert opened.count(paths[0]) == 1 and opened.count(paths[1]) == 1


def test_a_bad_clip_in_a_shared_reader_fails_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "v.mp4")
    write_video(path, _scene(4, 90, 160), fps=8)
    out = decode_many([(path, [0, 1]), (path, [2, 99]), (path, [3])], 32, 32)
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)
    cls, _, msg = out[1]
    assert issubclass(cls, ValueError) and "frame index 99 out of range" in msg
