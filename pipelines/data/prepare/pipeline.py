"""The run: manifest -> probe -> decode -> encode -> shards, and dataset.json at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipelines.data.prepare.captions import EmbedCaptions, _collect_text_table, embed_captions
from pipelines.data.prepare.decode import PLAN_COLUMNS, DecodeClips
from pipelines.data.prepare.encode import EncodeClips, decode_encode_write, fused_rows_per_task
from pipelines.data.prepare.manifest import read_manifest
from pipelines.data.prepare.options import (
    COLUMNS,
    DATASET_INFO,
    DECODE_BATCH_SIZE,
    DECODE_REJECTS_DIR,
    FORMAT_VERSION,
    REJECTS,
    RUN_STATE,
    STATS_LOG,
    TEXT_BATCH_SIZE,
    TEXT_TASK_MAX_CAPTIONS,
    PrepareError,
    PrepareOptions,
)
from pipelines.data.prepare.probe import probe_all
from pipelines.data.prepare.shards import _make_datasink, done_clip_ids, shard_files
from pipelines.data.prepare.state import _prepare_output, _settings_hash, _write_json
from sora_model.config import to_dict


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Run the pipeline; returns the dataset.json contents. Ray is started (or joined) on demand."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.data.runtime import cluster_cpus, cluster_gpus, ensure_ray
    from sora_model.autoencoder import build_autoencoder
    from sora_model.patch import patch_grid
    from sora_model.text import check_text_encoder

    t0 = time.perf_counter()
    opts = options
    out = Path(opts.out).resolve()
    entries, manifest_sha = read_manifest(opts.manifest)

    # Fail on a text encoder that cannot load, or shapes the autoencoder or the patch cannot take,
    # before any work starts.
    try:
        check_text_encoder(opts.text_encoder)
    except (ValueError, OSError, ImportError) as err:
        raise PrepareError(" ".join(str(err).split())) from None
    autoencoder = build_autoencoder(opts.autoencoder)
    grids = {}
    for b in opts.buckets:
        try:
            latent = autoencoder.latent_shape(b.frames, b.height, b.width)
            grids[b.name] = patch_grid(latent, opts.patch)
        except ValueError as err:
            raise PrepareError(f"bucket {b.name}: {err}") from None
    channels = autoencoder.latent_channels
    del autoencoder

    settings = opts.settings(manifest_sha)
    resuming = _prepare_output(out, settings, opts.overwrite)
    _write_json(out / RUN_STATE, {"settings_hash": _settings_hash(settings), "settings": settings})
    rejects_dir = out / DECODE_REJECTS_DIR

    ensure_ray()
    timings = {"setup": time.perf_counter() - t0}  # manifest, shape checks, Ray start or connect
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = opts.progress  # the caller's context: a library call with progress=False stays quiet
    cpus = cluster_cpus()
    workers = opts.workers or max(1, cpus - 1)

    # 0. Text embeddings of every caption the manifest could use, each once, in one task that runs
    # while the inputs are probed (a caption whose input is rejected costs one row of a small table).
    manifest_captions = sorted({e["caption"] for e in entries if e["caption"] and not e["error"]})
    text_task = None
    if manifest_captions and len(manifest_captions) <= TEXT_TASK_MAX_CAPTIONS:
        text_task = ray.remote(embed_captions).options(num_cpus=1).remote(manifest_captions, opts.text_encoder)

    # 1-2. Probe every input and plan its clips (metadata only, so it is materialised and read twice).
    planned = probe_all(entries, opts, cpus)
    timings["probe"] = time.perf_counter() - t0 - sum(timings.values())
    rejects = [r for r in planned if r["kind"] == "reject"]
    clips = sorted((r for r in planned if r["kind"] == "clip"), key=lambda r: (r["line"], r["start_s"]))
    first_line: dict[str, int] = {}
    unique_clips = []
    for r in clips:  # the same file listed twice would otherwise give two rows with one clip id
        if r["clip_id"] in first_line:
            if first_line[r["clip_id"]] != r["line"]:
                rejects.append(
                    {**r, "kind": "reject", "reason": "duplicate", "detail": f"same clip as line {first_line[r['clip_id']]}"}
                )
            continue
        first_line[r["clip_id"]] = r["line"]
        unique_clips.append(r)
    clips = unique_clips

    # Resume: skip every clip already in a complete shard.
    by_bucket: dict[str, list[dict[str, Any]]] = {b.name: [] for b in opts.buckets}
    skipped = 0
    for b in opts.buckets:
        done = done_clip_ids(out / b.name) if resuming else set()
        for r in clips:
            if r["bucket"] == b.name:
                if r["clip_id"] in done:
                    skipped += 1
                else:
                    by_bucket[b.name].append(r)
    if resuming:
        print(f"resuming {out}: {skipped} clips already written, {sum(map(len, by_bucket.values()))} to go")

    # 3. Text embeddings: the task started before probing, or an actor pool for a very large caption set.
    # Awaited here rather than inside the clip tasks: a task blocked in ray.get gives its CPU back and Ray
    # starts another worker process for the next one (seconds of imports), which cost more than it saved.
    captions = sorted({r["caption"] for rows in by_bucket.values() for r in rows})
    text_ref = None
    if captions and text_task is not None:
        text_ref = text_task
        text_dim = int(ray.get(text_task)["tokens"].shape[2])
    elif captions:
        text_ds = ray.data.from_items([{"caption": c} for c in captions]).map_batches(
            EmbedCaptions,
            fn_constructor_kwargs={"config": opts.text_encoder},
            batch_size=TEXT_BATCH_SIZE,
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(workers, math.ceil(len(captions) / TEXT_BATCH_SIZE)))),
            num_cpus=1,
        )
        text_table = _collect_text_table(text_ds)
        text_dim = int(text_table["tokens"].shape[2])
        text_ref = ray.put(text_table)
    timings["text"] = time.perf_counter() - t0 - sum(timings.values())

    # 4-7. Per bucket, stream: decode -> encode + patchify + text -> Parquet shards.
    use_gpu = opts.autoencoder.kind != "identity" and cluster_gpus() > 0
    stats_lines = []
    for b in opts.buckets:
        rows = by_bucket[b.name]
        if not rows:
            continue
        plan_cols = [{k: r[k] for k in (*PLAN_COLUMNS, "indices")} for r in rows]
        if opts.autoencoder.kind == "identity":
            # No weights to load: decode, patchify, attach text and write the shard in one task per batch.
            # One operator of one-CPU tasks: Ray Data's default per-operator CPU reservation only let it
            # run one task at a time on 2 cores (CPU 55% busy; without it 95%, 1008 clips 3.7 -> 2.7 s).
            # Datasets copy the context when created; the caller's is restored afterwards.
            per_task = fused_rows_per_task(len(rows), b.frames * b.height * b.width * 3, opts.rows_per_file, opts.workers or cpus)
            reservation = ctx.op_resource_reservation_enabled
            ctx.op_resource_reservation_enabled = False
            try:
                ds = ray.data.from_items(plan_cols, override_num_blocks=math.ceil(len(rows) / per_task)).map_batches(
                    decode_encode_write,
                    fn_kwargs={"bucket": b, "rejects_dir": str(rejects_dir), "autoencoder": opts.autoencoder, "patch": opts.patch,
                               "text_table": [text_ref], "folder": str(out / b.name)},
                    batch_size=None,  # each block (at most per_task rows) is one batch, one task and one shard
                    num_cpus=1,
                    concurrency=workers if opts.workers else None,
                ).materialize()  # fmt: skip
            finally:
                ctx.op_resource_reservation_enabled = reservation
        else:
            ds = ray.data.from_items(plan_cols, override_num_blocks=max(1, min(len(rows) // DECODE_BATCH_SIZE, 4 * cpus, 200)))
            ds = ds.map_batches(
                DecodeClips,
                fn_constructor_kwargs={"bucket": b, "rejects_dir": str(rejects_dir)},
                batch_size=DECODE_BATCH_SIZE,
                compute=ActorPoolStrategy(min_size=1, max_size=workers),
                num_cpus=1,
            )
            encode_args: dict[str, Any] = {"num_gpus": 1} if use_gpu else {"num_cpus": 0.5}
            ds = ds.map_batches(
                EncodeClips,
                fn_constructor_kwargs={"autoencoder": opts.autoencoder, "patch": opts.patch, "text_table": [text_ref]},
                batch_size=min(opts.rows_per_file, 64),
                compute=ActorPoolStrategy(min_size=1, max_size=max(1, cluster_gpus() if use_gpu else 1)),
                **encode_args,
            )
            ds.write_datasink(_make_datasink(str(out / b.name), opts.rows_per_file), ray_remote_args={"num_cpus": 0.25})
        stats_lines.append(f"==== bucket {b.name}: {len(rows)} clips ====\n{ds.stats()}\n")

    timings["clips"] = time.perf_counter() - t0 - sum(timings.values())

    # Rejects: the probe's plus any clip the decoders dropped.
    for path in sorted(rejects_dir.glob("*.jsonl")) if rejects_dir.is_dir() else []:
        rejects.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    reject_rows = [
        {k: r.get(k) for k in ("line", "path", "source", "reason", "detail")} for r in sorted(rejects, key=lambda r: r["line"])
    ]
    with open(out / REJECTS, "w") as f:
        for r in reject_rows:
            f.write(json.dumps(r) + "\n")
    if stats_lines:
        with open(out / STATS_LOG, "a") as f:
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} phases: {phases}\n" + "".join(stats_lines))

    import pyarrow.parquet as pq

    bucket_infos = []
    for b in opts.buckets:
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_files(out / b.name))
        bucket_infos.append(
            {
                "frames": b.frames,
                "height": b.height,
                "width": b.width,
                "name": b.name,
                "grid": list(grids[b.name]),
                "num_clips": n,
                "path": b.name,
            }
        )
    num_clips = sum(bi["num_clips"] for bi in bucket_infos)
    num_rejected = len({r["line"] for r in reject_rows})
    elapsed = time.perf_counter() - t0
    if num_clips == 0:
        raise PrepareError(f"no clips written: all {num_rejected} inputs were rejected; reasons in {out / REJECTS}")
    if text_ref is None:  # resumed with nothing left to do: dimensions from an existing shard
        first = next(p for bi in bucket_infos for p in shard_files(out / bi["path"]))
        text_dim = pq.ParquetFile(first).schema_arrow.field("text_pooled").type.list_size
    pt, ph, pw = opts.patch
    info = {
        "format_version": FORMAT_VERSION,
        "num_clips": num_clips,
        "num_rejected": num_rejected,
        "buckets": bucket_infos,
        "fps": opts.fps,
        "patch_size": list(opts.patch),
        "in_channels": channels,
        "patch_dim": channels * pt * ph * pw,
        "autoencoder": to_dict(opts.autoencoder),
        "text_encoder": {
            "name_or_path": opts.text_encoder.name_or_path,
            "max_length": opts.text_encoder.max_length,
            "hidden_layer": opts.text_encoder.hidden_layer,
            "dim": text_dim,
        },
        "manifest": {"path": str(opts.manifest), "sha256": manifest_sha},
        "clips_per_video": opts.clips_per_video,
        "stride_s": opts.stride_s,
        "columns": list(COLUMNS),
        "dtypes": {
            "patches": "float32",
            "grid": "int32",
            "text_tokens": "float16",
            "text_mask": "bool",
            "text_pooled": "float32",
        },
        "layout": "one folder per bucket, OUT/<frames>x<height>x<width>/part-*.parquet",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 2),
        "phase_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    _write_json(out / DATASET_INFO, info)
    print(f"{num_clips} clips written, {num_rejected} inputs rejected ({out}; {elapsed:.1f}s)")
    return info
