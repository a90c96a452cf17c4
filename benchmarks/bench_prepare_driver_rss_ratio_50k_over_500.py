"""Peak RSS of the `sora data prepare` driver on a 50,000-row manifest ÷ on a 500-row one.

The driver must not hold the manifest, the clip plans or the caption embeddings: its memory should not
grow with the manifest. Both runs take the same few real synthetic videos (`sora data synth`), listed
again and again with other start times and other captions, MSR-VTT-style: each (video, start) clip is
listed CAPTIONS_PER_CLIP times with different captions, so 50,000 rows are 10,000 one-frame clips, each
probed, decoded once, patchified and written with its 5 captions' embeddings (500 different captions,
cycled: the caption stage's cache serves the repeats; 8 text tokens per caption keep the shards small). Each run is a
fresh driver process (`python -m benchmarks.bench_prepare_driver_rss_ratio_50k_over_500 --child ...`) joined to one Ray
cluster that the benchmark starts (2 CPUs), so both pay the same imports; its peak RSS is `getrusage` max RSS at exit.
The details also give each driver's growth: peak minus its RSS just before `prepare` was called.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.common import main

FIGURE = "prepare_driver_rss_ratio_50k_over_500"
GOAL = ("<=", 1.3)
VIDEOS = 8
"""Real files the rows reuse (64 frames each, so 64 one-frame clips per file per pass of start times)."""
CAPTIONS = 500
CAPTIONS_PER_CLIP = 5


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_manifest(path: str, videos: list[str], rows: int) -> None:
    """Row i: clip c = i % clips (its k = i // clips-th caption), video c % VIDEOS at a start distinct per
    clip (within the 8 s video), caption (c * CAPTIONS_PER_CLIP + k) % 500: a clip's rows lie far apart in
    the manifest and carry different captions."""
    clips = rows // CAPTIONS_PER_CLIP
    with open(path, "w") as f:
        for i in range(rows):
            c = i % clips
            start = (c // VIDEOS) * (7.9 / (clips // VIDEOS + 1))
            caption = f"a shape moving, take {(c * CAPTIONS_PER_CLIP + i // clips) % CAPTIONS}"
            f.write(json.dumps({"path": videos[c % VIDEOS], "caption": caption, "start_s": round(start, 6)}) + "\n")


def child(address: str, manifest: str, out: str) -> None:
    """One driver: join the cluster, prepare, print {peak_mb, before_mb, clips, seconds} as JSON."""
    import ray

    from pipelines.data.prepare import Bucket, PrepareOptions, prepare
    from sora_model.config import TextEncoderConfig

    ray.init(address=address, log_to_driver=False)
    before = _rss_mb()
    t0 = time.perf_counter()
    info = prepare(
        PrepareOptions(
            manifest=manifest,
            out=out,
            buckets=[Bucket(1, 16, 16)],
            progress=False,
            text_encoder=TextEncoderConfig(max_length=8),
        )
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "peak_mb": round(peak, 1),
                "before_mb": round(before, 1),
                "clips": info["num_clips"],
                "rejected": info["num_rejected"],
                "seconds": round(seconds, 1),
            }
        )
    )


def run(quick: bool) -> dict:
    import ray

    from pipelines.data.synth import synth

    small, large = 500, 50_000
    work = tempfile.mkdtemp(prefix="bench-rss-")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = synth(os.path.join(work, "shapes"), VIDEOS, size=16, frames=64, fps=8, progress=False)
        videos = [json.loads(line)["path"] for line in open(manifest)]
        videos = [os.path.join(os.path.dirname(manifest), v) for v in videos]
        runs = {}
        for name, rows in (("warm", small), ("small", small), ("large", large)):
            path = os.path.join(work, f"{name}.jsonl")
            write_manifest(path, videos, rows)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_prepare_driver_rss_ratio_50k_over_500",
                    "--child",
                    ctx.address_info["address"],
                    path,
                    os.path.join(work, f"out-{name}"),
                ],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{name} run failed: {proc.stderr.strip().splitlines()[-3:]}")
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name]["rows"] = rows
    finally:
        ray.shutdown()
        subprocess.run(["rm", "-rf", work])
    ratio = runs["large"]["peak_mb"] / runs["small"]["peak_mb"]
    growth = {n: round(r["peak_mb"] - r["before_mb"], 1) for n, r in runs.items()}
    return {
        "value": round(ratio, 3),
        "compared": (
            f"peak RSS of the `sora data prepare` driver process, {large:,}-row manifest / {small}-row manifest "
            f"({VIDEOS} synthetic 16x16 videos reused: {CAPTIONS_PER_CLIP} captions per clip, other start times, "
            f"{CAPTIONS} captions cycled; 1x16x16 clips, 2 CPUs)"
        ),
        "details": {
            "runs": runs,
            "driver_growth_mb": growth,
            "note": "the first small run warms the cluster's workers and is not used",
        },
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main(sys.modules[__name__]))
