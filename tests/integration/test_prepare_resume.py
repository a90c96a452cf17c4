"""Resume at clip level, on one local Ray (2 CPUs): a video with a corrupt GOP in the middle gives good clips and
one rejected clip; an interrupted run, resumed, must end with exactly the clips and rejects of an uninterrupted one.

The interruption is what a kill leaves: any subset of the shards and reject files the run wrote, no dataset.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
av = pytest.importorskip("av")

from pipelines.data.load import read_prepared  # noqa: E402
from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare  # noqa: E402
from sora_model.video import probe_video, read_frames  # noqa: E402

FPS = 8
FRAMES = 48  # 6 s: six 1-s clips of 8 frames
GOP = 8  # one keyframe per clip, so a corrupt GOP spoils exactly one clip
BAD_GOP = 3  # the clip at 3 s


def write_gop_video(path: Path, seed: int, frames: int = FRAMES, size: int = 64) -> None:
    """An H.264 MP4 with a keyframe every GOP frames and no B-frames; moving content, so clips differ."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream(
            "libx264", rate=FPS, options={"g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0", "bf": "0"}
        )
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        base = rng.integers(0, 200, 3)
        for i in range(frames):
            f = np.zeros((size, size, 3), np.uint8)
            f[:] = (base + 3 * i) % 255
            x = (5 * i) % (size - 16)
            f[20:36, x : x + 16] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def corrupt_gop(path: Path, gop: int) -> None:
    """Zero the bytes of every packet of GOP `gop` in place: the container and its index stay intact (the file
    probes fine, every packet is present), but those frames cannot be decoded ("Invalid NAL unit size")."""
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    for pos, size in packets[gop * GOP : (gop + 1) * GOP]:
        data[pos : pos + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Two videos (one with a corrupt middle GOP), every clip that fits, one clip per shard; the uninterrupted run."""
    root = tmp_path_factory.mktemp("gop")
    write_gop_video(root / "good.mp4", seed=1)
    write_gop_video(root / "bad.mp4", seed=2)
    corrupt_gop(root / "bad.mp4", BAD_GOP)
    assert probe_video(str(root / "bad.mp4")).num_frames == FRAMES  # probes fine: the damage is found at decode
    with pytest.raises(ValueError, match="truncated"):
        read_frames(str(root / "bad.mp4"), list(range(BAD_GOP * GOP, BAD_GOP * GOP + GOP)))
    manifest = root / "m.jsonl"
    manifest.write_text(
        json.dumps({"path": "good.mp4", "caption": "a good video"})
        + "\n"
        + json.dumps({"path": "bad.mp4", "caption": "a video with a bad middle"})
        + "\n"
    )
    out = root / "full"
    info = prepare(_options(manifest, out))
    return {
        "manifest": manifest,
        "out": out,
        "info": info,
        "ids": _clip_ids(out),
        "rejects": (out / "rejects.jsonl").read_text(),
    }


def _options(manifest: Path, out: Path) -> PrepareOptions:
    return PrepareOptions(
        manifest=str(manifest),
        out=str(out),
        buckets=parse_buckets("8x32x32"),
        patch=(1, 4, 4),
        fps=FPS,
        clips_per_video=0,
        rows_per_file=1,
        progress=False,
    )


def _clip_ids(out: Path) -> list[str]:
    return sorted(read_prepared(out, columns=["clip_id"])["clip_id"].tolist())


def test_uninterrupted_run_keeps_the_good_clips_of_a_video_with_a_bad_gop(full_run):
    info, rejects = full_run["info"], [json.loads(r) for r in full_run["rejects"].splitlines()]
    assert info["num_clips"] == 11 == len(full_run["ids"])  # 6 + 5
    assert len(rejects) == 1 and rejects[0]["path"] == "bad.mp4" and rejects[0]["reason"] == "truncated"
    assert "clip at 3s" in rejects[0]["detail"] and rejects[0]["clip_id"]
    starts = read_prepared(full_run["out"], columns=["source", "start_s"])
    bad = sorted(s for src, s in zip(starts["source"], starts["start_s"], strict=True) if src.endswith("bad.mp4"))
    assert bad == [0.0, 1.0, 2.0, 4.0, 5.0]


# (shards kept, in the order of their file names, which is a hash: an arbitrary subset; the decode reject kept)
INTERRUPTIONS = [(0, True), (2, True), (6, True), (10, True), (4, False)]


@pytest.mark.parametrize(("kept", "keep_reject"), INTERRUPTIONS)
def test_resume_after_any_interruption_equals_the_uninterrupted_run(full_run, tmp_path, kept, keep_reject):
    out = tmp_path / "resumed"
    shutil.copytree(full_run["out"], out)
    (out / "dataset.json").unlink()
    (out / "rejects.jsonl").unlink()
    shards = sorted((out / "8x32x32").glob("part-*.parquet"))
    for p in shards[kept:]:
        p.unlink()
    if not keep_reject:
        shutil.rmtree(out / "_rejects")
    info = prepare(_options(full_run["manifest"], out))
    assert _clip_ids(out) == full_run["ids"]
    assert info["num_clips"] == full_run["info"]["num_clips"]
    assert (out / "rejects.jsonl").read_text() == full_run["rejects"]


# ---------------------------------------------------------------------------------------------
# The run's own storage failing (a real full filesystem: a tmpfs mounted with a tiny size) stops the run
# with one line and rejects nothing; the same command resumes once there is room.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of 64 KiB; skipped where this process may not mount (needs root / CAP_SYS_ADMIN)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _resize(disk: Path, size: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def test_a_full_output_disk_stops_the_run_in_one_line_and_the_same_command_resumes(full_run, tiny_disk):
    out = tiny_disk / "prepared"
    with pytest.raises(Exception) as err:  # noqa: PT011 - which exception is what this test checks
        prepare(_options(full_run["manifest"], out))
    assert type(err.value).__name__ == "StorageFailed", f"{type(err.value).__name__}: {str(err.value)[:300]}"
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "no input was rejected" in message
    rejected = (
        [json.loads(r) for f in (out / "_rejects").glob("*.jsonl") for r in f.read_text().splitlines()]
        if (out / "_rejects").is_dir()
        else []
    )
    assert all(r.get("clip_id") and "clip at 3s" in r["detail"] for r in rejected)  # only the bad GOP, never ENOSPC
    assert not (out / "dataset.json").exists()
    _resize(tiny_disk, "16m")
    info = prepare(_options(full_run["manifest"], out))
    assert _clip_ids(out) == full_run["ids"] and info["num_clips"] == full_run["info"]["num_clips"]
    assert (out / "rejects.jsonl").read_text() == full_run["rejects"]


@pytest.fixture
def http_videos(full_run):
    """The run's folder served over HTTP on loopback: inputs that a stage copies to its scratch folder."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = full_run["manifest"].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    manifest = root / "http.jsonl"
    manifest.write_text(
        "".join(json.dumps({"path": f"{url}/{n}.mp4", "caption": f"{n} over http"}) + "\n" for n in ("good", "bad"))
    )
    yield manifest
    server.shutdown()


def test_a_full_scratch_disk_stops_the_run_instead_of_rejecting_remote_inputs(
    full_run, http_videos, tiny_disk, tmp_path
):
    from pipelines.data.prepare import StorageFailed

    assert (full_run["manifest"].parent / "good.mp4").stat().st_size > 0
    _resize(tiny_disk, "4k")  # smaller than either video
    (tiny_disk / "filler").write_bytes(b"\0" * 4096)  # and full
    out = tmp_path / "remote"
    opts = PrepareOptions(**{**_options(http_videos, out).__dict__, "scratch": str(tiny_disk)})
    with pytest.raises(StorageFailed, match="No space left on device"):
        prepare(opts)
    assert not list((out / "_rejects").glob("*.jsonl")) if (out / "_rejects").is_dir() else True  # no input rejected
    info = prepare(PrepareOptions(**{**opts.__dict__, "scratch": None}))  # the same run, room to copy: it resumes
    assert info["num_clips"] == 11 and info["num_rejected"] == 1
