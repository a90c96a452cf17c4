"""Clips/s of `sora data prepare` (Ray Data, actor pools) ÷ a plain single-process decord loop doing the same work.

Both sides take the same synthetic dataset (`sora data synth`) and produce the same rows: decode the
clip's frames with decord, resize + centre-crop to the bucket, patchify (identity autoencoder), embed
each unique caption once with the same text encoder (MiniLM), and write zstd Parquet shards with the
same schema. The loop calls the very functions the pipeline's actors call (`read_frames`,
`resize_center_crop`, `patchify`, `row_schema`, the text encoder), in one process, no Ray; the row
counts of both outputs are checked equal.

Why fair: Ray is started before timing on both sides' behalf (a cluster is up before jobs are
submitted), both runs are repeated interleaved in one command, and each run's wall time covers
everything from the manifest to the last shard on disk, including each side's one-time text-encoder
load. One untimed round of each side runs first: it starts Ray's worker processes (a cluster that has
run a job has them; on a 2-core machine their first start costs seconds, more than the quick mode's
whole job) and warms the loop's imports and file cache the same way. The cold round's times are kept
in the details. Ray's workers are limited to the machine's 2 CPUs (the issue's setting); the loop uses torch's
default threads; both decode with one decoder thread per file (`sora_model.video.DECORD_THREADS`).
Whether 2 cores give a speedup depends on the job being large against Ray's fixed costs per run (about a
second here: starting the probe tasks and the Ray Data execution, the text task's encoder load), so
clips are 16 frames of 64x64 video resized to 32x32 and even the quick mode prepares 504 videos
(8 ms of work a clip in the loop; at 96 videos the loop's whole job takes about that fixed cost).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import main, paired_ratio, summary

FIGURE = "data_speedup_vs_decord_loop"
GOAL = (">=", 1.6)


def decord_loop(
    manifest: str, out: str, frames: int, res: int, fps: float, patch=(1, 4, 4), rows_per_file: int = 256
) -> int:
    """The baseline: one process, one clip after another; returns rows written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.data.prepare import PARQUET_COMPRESSION, clip_id, resize_center_crop, row_schema
    from pipelines.data.prepare.encode import _fixed_list
    from sora_model.autoencoder import pixels_to_model
    from sora_model.config import TextEncoderConfig
    from sora_model.patch import patch_grid, patchify
    from sora_model.text import build_text_encoder
    from sora_model.video import probe_video, read_frames, sample_indices

    base = os.path.dirname(os.path.abspath(manifest))
    entries = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    encoder = build_text_encoder(TextEncoderConfig())
    captions = sorted({e["caption"] for e in entries})
    emb = encoder.encode(captions)
    row_of = {c: i for i, c in enumerate(captions)}
    tokens_all = emb.tokens.float().numpy().astype(np.float16)
    mask_all, pooled_all = emb.mask.numpy().astype(bool), emb.pooled.float().numpy()
    os.makedirs(out, exist_ok=True)
    rows: list[dict] = []
    written = 0

    def flush(rows: list[dict]) -> None:
        toks = np.stack([r["tokens"] for r in rows])
        grid = np.asarray(rows[0]["grid"], dtype=np.int32)
        idx = np.asarray([row_of[r["caption"]] for r in rows])
        schema = row_schema(toks.shape[1], toks.shape[2], tokens_all.shape[1], tokens_all.shape[2])
        cols = [
            pa.array([r["clip_id"] for r in rows], pa.string()),
            pa.array([r["source"] for r in rows], pa.string()),
            pa.array(np.zeros(len(rows))),
            pa.array(np.full(len(rows), fps, dtype=np.float32)),
            pa.array([r["caption"] for r in rows], pa.string()),
            _fixed_list(toks, pa.float32()),
            _fixed_list(np.broadcast_to(grid, (len(rows), 3)), pa.int32()),
            _fixed_list(tokens_all[idx], pa.float16()),
            _fixed_list(mask_all[idx], pa.bool_()),
            _fixed_list(pooled_all[idx], pa.float32()),
        ]
        pq.write_table(
            pa.Table.from_arrays(cols, schema=schema),
            os.path.join(out, f"part-{written:05d}.parquet"),
            compression=PARQUET_COMPRESSION,
        )

    for e in entries:
        src = os.path.join(base, e["path"])
        info = probe_video(src)
        clip = resize_center_crop(read_frames(src, sample_indices(info, frames, fps, 0.0)), res, res)  # (F, H, W, 3)
        with torch.no_grad():
            video = pixels_to_model(torch.from_numpy(clip)[None])  # (1, 3, F, H, W)
            toks = patchify(video, patch)[0].numpy()  # (N, P)
        rows.append(
            {
                "clip_id": clip_id(src, 0.0),
                "source": src,
                "caption": e["caption"],
                "tokens": toks,
                "grid": patch_grid(tuple(video.shape[2:]), patch),
            }
        )
        if len(rows) == rows_per_file:
            flush(rows)
            written += len(rows)
            rows = []
    if rows:
        flush(rows)
        written += len(rows)
    return written


def count_rows(folder: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(folder).rglob("part-*.parquet"))


def run(quick: bool) -> dict:
    import ray

    from pipelines.data.prepare import Bucket, PrepareOptions, prepare
    from pipelines.data.synth import synth

    num_videos, size, frames, res, fps = (504, 64, 16, 32, 8) if quick else (1008, 64, 16, 32, 8)
    load_before = os.getloadavg()[0]
    reps = 3
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-data-")
    try:
        manifest = str(
            synth(os.path.join(work, "shapes"), num_videos, size=size, frames=frames, fps=fps, progress=False)
        )
        counts = {}

        runs = itertools.count()

        def run_ray():
            out = os.path.join(work, f"ray{next(runs)}")
            info = prepare(
                PrepareOptions(manifest=manifest, out=out, buckets=[Bucket(frames, res, res)], fps=fps, progress=False)
            )
            counts["ray_phase_seconds"] = info.get("phase_seconds")
            counts["ray"] = count_rows(out)
            shutil.rmtree(out)

        def run_loop():
            out = os.path.join(work, f"loop{next(runs)}")
            decord_loop(manifest, out, frames, res, fps)
            counts["loop"] = count_rows(out)
            shutil.rmtree(out)

        times: dict[str, list[float]] = {"ray": [], "loop": []}
        cold: dict[str, float] = {}
        for name, fn in (("ray", run_ray), ("loop", run_loop)):  # the untimed round (see the docstring)
            t0 = time.perf_counter()
            fn()
            cold[name] = round(time.perf_counter() - t0, 2)
        for r in range(reps):
            for name, fn in (("loop", run_loop), ("ray", run_ray)) if r % 2 else (("ray", run_ray), ("loop", run_loop)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    speedup = paired_ratio(times["loop"], times["ray"])
    load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    note = None
    if speedup < GOAL[1]:
        note = (
            f"load average {load[0]} -> {load[1]} on {os.cpu_count()} cores: the loop is one process and Ray's side "
            "two, so other processes' load moves the ratio; compare with the figure at a lower load"
        )
    return {
        "note": note,
        "value": round(speedup, 3),
        "compared": (
            f"clips/s of `sora data prepare` (Ray Data, 2 CPUs) / a single-process decord loop, {num_videos} synthetic "
            f"{size}x{size} videos -> {frames}x{res}x{res} clips, patch 1x4x4, MiniLM captions, zstd Parquet"
        ),
        "details": {
            "rows": {k: counts.get(k) for k in ("ray", "loop")},
            "rows_match": counts.get("ray") == counts.get("loop"),
            "ray_phase_seconds_last_run": counts.get("ray_phase_seconds"),
            "clips_per_s": {n: round(num_videos / (sum(ts) / len(ts)), 2) for n, ts in times.items()},
            "seconds": {n: summary(ts, 2) for n, ts in times.items()},
            "ray_started_before_timing": True,
            "cold_round_seconds": cold,
            "load_average_1min_before_after": load,
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
