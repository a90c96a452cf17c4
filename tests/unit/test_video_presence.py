"""Probing a remote video by byte ranges: `RangeFile` over fsspec's in-memory filesystem, the probe and the
truncation check reading an open file instead of a downloaded copy."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from pipelines.data.prepare.storage import RangeFile, StorageError
from sora_model.video import VideoReadError, probe_video, write_video
from sora_model.video_presence import require_frames_present

FRAMES = 96


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[str, bytes]:
    """A 2 MB faststart MP4: incompressible frames, so its packets spread over the whole file."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (FRAMES, 192, 192, 3), dtype=np.uint8)  # (T, H, W, 3)
    path = write_video(str(tmp_path_factory.mktemp("ranges") / "noise.mp4"), frames, fps=24)
    with open(path, "rb") as f:
        return path, f.read()


def _upload(data: bytes, name: str = "v.mp4") -> str:
    uri = f"memory://ranges-{uuid.uuid4().hex}/{name}"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


def test_range_file_reads_the_bytes_at_any_position_fetching_each_block_once(noisy):
    _, data = noisy
    f = RangeFile(_upload(data), block=64 << 10, blocks=4)
    assert f.size == len(data) and f.read(100) == data[:100]
    f.seek(len(data) - 5000)
    assert f.read() == data[-5000:] and f.tell() == len(data) and f.read(10) == b""
    fetched = f.bytes_read
    f.seek(-3000, 2)
    assert f.read(3000) == data[-3000:] and f.bytes_read == fetched  # a kept block is not fetched again
    rng = np.random.default_rng(1)
    for start in rng.integers(0, len(data), 20):
        f.seek(int(start))
        assert f.read(70_000) == data[start : start + 70_000]  # across block boundaries
    with pytest.raises(StorageError) as err:
        RangeFile(f"memory://ranges-{uuid.uuid4().hex}/missing.mp4")
    assert err.value.reason == "missing"


def test_probe_and_frame_check_by_ranges_read_a_fraction_of_the_file(noisy):
    path, data = noisy
    local = probe_video(path)
    with RangeFile(_upload(data)) as f:
        info = probe_video(f)
        assert (info.num_frames, info.fps, info.width, info.height) == (
            local.num_frames,
            local.fps,
            local.width,
            local.height,
        )
        require_frames_present(f, 21, info.num_frames)  # an 8-frame clip at 8 fps from the start
        require_frames_present(f, FRAMES - 1, info.num_frames)  # the last frame: its packet is read, not all before it
        assert f.bytes_read < len(data) / 2, (f.bytes_read, len(data))


def test_a_file_cut_after_its_index_fails_the_frame_check_by_ranges(noisy):
    _, data = noisy
    with RangeFile(_upload(data[: len(data) // 2], "cut.mp4")) as f:
        info = probe_video(f)  # the index at the front is whole: it probes
        assert info.num_frames == FRAMES
        require_frames_present(f, 10, FRAMES)  # the frames before the cut are there
        for index in (FRAMES - 1, FRAMES * 3 // 4):
            with pytest.raises(VideoReadError, match="^truncated/undecodable"):
                require_frames_present(f, index, FRAMES)
    with RangeFile(_upload(b"", "empty.mp4")) as f, pytest.raises(VideoReadError, match="^empty file"):
        probe_video(f)
    with (
        RangeFile(_upload(b"not a video at all, just text", "text.mp4")) as f,
        pytest.raises(VideoReadError, match="^not a video"),
    ):
        probe_video(f)
