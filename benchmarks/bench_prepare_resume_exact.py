"""Held-out interruption test of `sora data prepare`: the share of kill points after which the resumed run ends
with exactly the uninterrupted run's clips (same clip ids) and rejects (same rejects.jsonl). 1.0 is the goal.

    python -m benchmarks.bench_prepare_resume_exact [--quick]

Held out from tests/integration/test_prepare_resume.py: other videos (a wide 80x48 one at 8 fps with a corrupt
GOP at 1 s and listed twice with two captions, a 12 fps one with a corrupt GOP at 4 s, a clean one, a file of
random bytes), two clips per shard, and real interruptions: each run is a fresh driver process
(`--child`) joined to one Ray cluster the benchmark starts (2 CPUs), SIGKILLed at a kill point, then the same
command again. Kill points: "shards:K" (the output holds K shards; 0 = as soon as the run has started) and
"reject:N" (the N-th clip reject file of the decode stage has appeared: the state where a bad clip is recorded
and its video's other clips may not be written yet, which lost clips before issue 31's fix). A point where
the driver finished before the kill is counted as such in the details (it still has to end equal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import main

FIGURE = "prepare_resume_exact"
GOAL = (">=", 1.0)
BUCKET = "8x32x32"
ROOT = Path(__file__).resolve().parents[1]


def write_video(
    path: Path, frames: int, fps: int, gop: int, size: tuple[int, int], bad_gop: int | None, seed: int
) -> None:
    """H.264 with a keyframe every `gop` frames, no B-frames, moving content; GOP `bad_gop` zeroed in place
    (the index stays whole, so the file probes fine and only that GOP's frames fail to decode)."""
    import av
    import numpy as np

    w, h = size
    base = np.random.default_rng(seed).integers(0, 200, 3)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream(
            "libx264", rate=fps, options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"}
        )
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            f = np.zeros((h, w, 3), np.uint8)
            f[:] = (base + 2 * i) % 255
            x = (3 * i) % (w - 12)
            f[h // 3 : h // 3 + 12, x : x + 12] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    if bad_gop is None:
        return
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    for pos, size_ in packets[bad_gop * gop : (bad_gop + 1) * gop]:
        data[pos : pos + size_] = bytes(size_)
    path.write_bytes(bytes(data))


def make_inputs(work: Path) -> Path:
    write_video(work / "wide.mp4", 80, 8, 8, (80, 48), bad_gop=1, seed=3)
    write_video(work / "twelve.mp4", 72, 12, 12, (64, 64), bad_gop=4, seed=4)
    write_video(work / "clean.mp4", 40, 8, 8, (64, 64), bad_gop=None, seed=5)
    (work / "noise.mp4").write_bytes(os.urandom(3000))
    rows = [
        ("wide.mp4", "a wide video"),
        ("twelve.mp4", "a twelve fps video"),
        ("clean.mp4", "a clean video"),
        ("noise.mp4", "not a video at all"),
        ("wide.mp4", "the wide video, said again"),
    ]
    manifest = work / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    return manifest


def child(address: str, manifest: str, out: str) -> None:
    """One driver: join the cluster and run prepare (killed from outside, or to the end)."""
    import ray

    from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare

    ray.init(address=address, log_to_driver=False)
    prepare(
        PrepareOptions(
            manifest=manifest,
            out=out,
            buckets=parse_buckets(BUCKET),
            patch=(1, 4, 4),
            fps=8,
            clips_per_video=0,
            rows_per_file=2,
            progress=False,
        )
    )


def _reached(out: Path, point: str) -> bool:
    kind, n = point.split(":")
    if not (out / "_run.json").exists():
        return False
    if kind == "shards":
        return (len(list((out / BUCKET).glob("part-*.parquet"))) if (out / BUCKET).is_dir() else 0) >= int(n)
    return (len(list((out / "_rejects").glob("decode-*.jsonl"))) if (out / "_rejects").is_dir() else 0) >= int(n)


def drive(address: str, manifest: Path, out: Path, kill_at: str | None) -> str:
    """Run one driver; SIGKILL it at the kill point `kill_at`. Returns "killed" or "finished"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_prepare_resume_exact", "--child", address, str(manifest), str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_at is not None:
        while proc.poll() is None:
            if _reached(out, kill_at):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return "killed"
            time.sleep(0.01)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed: {err.strip().splitlines()[-3:]}")
    return "finished"


def outcome(out: Path) -> dict:
    import pyarrow.parquet as pq

    ids = sorted(
        i
        for f in (out / BUCKET).glob("part-*.parquet")
        for i in pq.read_table(f, columns=["clip_id"]).column("clip_id").to_pylist()
    )
    info = json.loads((out / "dataset.json").read_text())
    return {"ids": ids, "rejects": (out / "rejects.jsonl").read_text(), "num_clips": info["num_clips"]}


def run(quick: bool) -> dict:
    import ray

    kill_points = ["shards:0", "reject:1", "reject:2", "shards:3"]
    if not quick:
        kill_points += ["shards:1", "shards:2", "shards:5", "shards:7"]
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ctx.address_info["address"]
    points = []
    try:
        manifest = make_inputs(work)
        drive(address, manifest, work / "warm", None)  # warms the cluster's workers (imports, the text encoder)
        drive(address, manifest, work / "full", None)
        full = outcome(work / "full")
        for k in kill_points:
            out = work / f"kill-{k.replace(':', '-')}"
            how = drive(address, manifest, out, k)
            left = len(list((out / BUCKET).glob("part-*.parquet"))) if (out / BUCKET).is_dir() else 0
            if how == "killed":
                drive(address, manifest, out, None)  # the same command again: resume
            got = outcome(out)
            points.append(
                {
                    "kill_at": k,
                    "driver": how,
                    "shards_left_by_kill": left,
                    "clips": got["num_clips"],
                    "equal": got["ids"] == full["ids"]
                    and got["rejects"] == full["rejects"]
                    and got["num_clips"] == full["num_clips"],
                }
            )
    finally:
        ray.shutdown()
        subprocess.run(["rm", "-rf", str(work)])
    value = sum(p["equal"] for p in points) / len(points)
    return {
        "value": round(value, 3),
        "compared": (
            f"share of {len(points)} real kill points (driver SIGKILLed at {', '.join(kill_points)}) after which the "
            "resumed `sora data prepare` equals the uninterrupted run (clip ids, rejects.jsonl, count: "
            f"{full['num_clips']} clips); held-out videos with corrupt middle GOPs, 2 clips per shard, a "
            "multi-caption line, 2 CPUs"
        ),
        "details": {
            "points": points,
            "uninterrupted_clips": full["num_clips"],
            "uninterrupted_rejects": full["rejects"].count("\n"),
        },
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main(sys.modules[__name__]))
