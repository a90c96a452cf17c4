"""The run: one streaming Ray Data plan from the manifest to the shards, and dataset.json at the end.

    manifest chunks --parse (drop finished lines)--> entries --group by source--> plan (probe each file once,
    clips with all their captions; drop written clips) --captions (actors, one per GPU; on CPU-only clusters
    tasks; batched, fp16)--> decode + patchify + write shards (tasks)
    |  with a VAE: decode (tasks) --> encode (GPU actors) --> write (tasks)

The driver holds the manifest's scan (bounded), the plan and a counter; rows stream through the object
store, and the first clips are decoded while later files are still being probed. Grouping by source is the
one barrier, over the manifest's small rows only (group.py: a hash partition in plain tasks): it brings
every row of a file into one block, so the file is probed once and a clip listed with several captions is
decoded once.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import console
from pipelines.data.prepare.captions import CAPTION_ROWS, EmbedCaptions, embed_task
from pipelines.data.prepare.curate import CURATE_COLUMNS, CURATE_DTYPES
from pipelines.data.prepare.encode import EncodeClips, batch_rows, decode_encode_write, decode_to_pixels, write_rows
from pipelines.data.prepare.group import group_by_source
from pipelines.data.prepare.manifest import ManifestScan, scan_manifest
from pipelines.data.prepare.options import (
    COLUMNS,
    DATASET_INFO,
    DECODE_REJECTS_DIR,
    DTYPES,
    FORMAT_VERSION,
    IMAGE_CONDITION_COLUMNS,
    IMAGE_CONDITION_DTYPES,
    MANIFEST_CHUNKS_PER_CPU,
    REJECTS,
    RUN_STATE,
    STATS_LOG,
    PrepareError,
    PrepareOptions,
    StorageFailed,
    decode_batch_bytes,
)
from pipelines.data.prepare.probe import Guards, plan_block
from pipelines.data.prepare.shards import (
    curate_summary,
    filesystem,
    join,
    merge_rejects,
    resume_state,
    shard_files,
    shard_summary,
)
from pipelines.data.prepare.state import prepare_output, settings_hash, write_json
from pipelines.data.prepare.storage import StorageUnavailable, is_uri
from sora_model.config import to_dict


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Run the pipeline; returns the dataset.json contents. Ray is started (or joined) on demand.

    A failure of the run's own storage (a full disk, an I/O error, a store unreachable after retries), in
    the driver or in any task, stops the run with StorageFailed (one line) and rejects no input."""
    try:
        return _prepare(options)
    except Exception as err:
        cause = _storage_cause(err)
        if cause is None:
            raise
        out = options.out
        raise StorageFailed(
            f"storage failed, run stopped (no input was rejected for it): {cause}; "
            f"make room or fix the storage, then run the same command again to resume {out}"
        ) from None


def _storage_cause(err: BaseException) -> str | None:
    """The one-line message of a StorageUnavailable behind `err`: raised here, or in a Ray task (Ray wraps the
    task's exception, keeping it as `cause`, in the chain, or through Ray Data only in the traceback's text)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageUnavailable):
            return " ".join(str(e.args[0] if e.args else e).split())
        # Ray Data hands back a UserCodeException without the task's exception, only its traceback as text.
        found = re.findall(rf"{StorageUnavailable.__name__}: (.+)", str(e))
        if found:
            return found[-1].strip()
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _prepare(options: PrepareOptions) -> dict[str, Any]:
    import ray

    from pipelines.data.runtime import cluster_cpus, ensure_ray

    t0 = time.perf_counter()
    opts = options
    out = opts.out.rstrip("/") if is_uri(opts.out) else str(Path(opts.out).resolve())
    scan = scan_manifest(opts.manifest)
    grids, channels = check_shapes(opts)
    settings = opts.settings(scan.sha256)
    resuming = prepare_output(out, settings, opts.overwrite)
    write_json(join(out, RUN_STATE), {"settings_hash": settings_hash(settings), "settings": settings})

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.op_resource_reservation_enabled)
    # progress=False (a library call), or a console: quiet
    ctx.enable_progress_bars = opts.progress and console.library_bars()
    # Ray Data reserves CPUs per operator; on a small machine that held the decode stage to one task at a
    # time (2 cores: 55% busy). Without it every stage takes what is free (the streaming executor still
    # bounds each operator's queued output, which is what keeps memory flat).
    ctx.op_resource_reservation_enabled = False
    if opts.null_prompt:
        # First, so a dataset cut short is already usable for caption dropout; in a task: the driver may be a
        # head node without room for the text encoder.
        from pipelines.data.null_prompt import read_null_prompt_at, write_null_prompt

        if not (resuming and read_null_prompt_at(out, opts.text_encoder)):
            ray.get(ray.remote(write_null_prompt).options(num_cpus=1).remote(out, opts.text_encoder))
    try:
        done = None
        if resuming:
            summary_ref, done = (
                ray.remote(_resume_summary)
                .options(num_cpus=0, num_returns=2)
                .remote(out, [b.name for b in opts.buckets])
            )
            summary = ray.get(summary_ref)
            if opts.progress:
                print(
                    f"resuming {out}: {summary['written']} clips already written, {summary['lines']} manifest lines "
                    "finished"
                    + (
                        f", {summary['damaged']} damaged shards set aside to be rewritten" if summary["damaged"] else ""
                    ),
                    file=sys.stderr,
                )
        ds = build_plan(scan, opts, out, done, cluster_cpus())
        written, shards = _drain(ds, opts.progress, scan.num_rows, t0)
        stats = ds.stats()
    finally:
        ctx.enable_progress_bars, ctx.op_resource_reservation_enabled = saved

    num_rejected, clips_rejected = merge_rejects(join(out, DECODE_REJECTS_DIR), join(out, REJECTS))
    _append_stats(out, stats, written, shards, time.perf_counter() - t0)
    return _finish(opts, out, scan, grids, channels, (num_rejected, clips_rejected), time.perf_counter() - t0)


def check_shapes(opts: PrepareOptions) -> tuple[dict[str, Any], int]:
    """Fail on a text encoder that cannot load, or shapes the autoencoder or the patch cannot take, before
    any work starts; returns each bucket's token grid and the autoencoder's channels."""
    from sora_model.autoencoder import build_autoencoder
    from sora_model.patch import patch_grid
    from sora_model.text import check_text_encoder

    try:
        check_text_encoder(opts.text_encoder)
    except (ValueError, OSError, ImportError) as err:
        raise PrepareError(" ".join(str(err).split())) from None
    autoencoder = build_autoencoder(opts.autoencoder)
    encoder = opts.image_conditioning.encoder if opts.image_conditioning else None
    for folder in () if encoder is None else (encoder.path, encoder.processor_path or encoder.path):
        if not folder or not Path(folder).is_dir():
            raise PrepareError(f"--image-conditioning: the export's image encoder folder '{folder}' is missing")
    grids = {}
    for b in opts.buckets:
        try:
            grids[b.name] = patch_grid(autoencoder.latent_shape(b.frames, b.height, b.width), opts.patch)
        except ValueError as err:
            raise PrepareError(f"bucket {b.name}: {err}") from None
    return grids, autoencoder.latent_channels


def _resume_summary(out: str, buckets: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    state = resume_state(out, buckets)
    return {"written": state["written"], "lines": len(state["lines"]), "damaged": state["damaged"]}, state


def build_plan(scan: ManifestScan, opts: PrepareOptions, out: str, done: Any, cpus: int) -> Any:
    """The Ray Data plan (lazy): manifest -> shards; its output rows are {bucket, shard, rows} per shard.

    Stages: plan (group by source, probe) -> captions -> decode + patchify + write, or with a VAE
    decode -> encode -> write."""
    import ray
    from ray.data import TaskPoolStrategy

    from pipelines.data.runtime import cluster_gpus

    gpus = cluster_gpus()
    ds = _plan_stage(scan, opts, out, done, cpus)
    ds = _caption_stage(ds, opts, gpus)
    largest = max(b.frames * b.height * b.width * 3 for b in opts.buckets)
    rows = batch_rows(largest, opts.rows_per_file, decode_batch_bytes(ray.nodes(), opts.workers, opts.decode_batch_mib))
    concurrency = {"compute": TaskPoolStrategy(size=opts.workers)} if opts.workers else {}
    if opts.autoencoder.kind == "identity":
        return ds.map_batches(
            decode_encode_write,
            batch_size=rows,
            batch_format="pyarrow",
            num_cpus=1,
            **concurrency,
            fn_kwargs={
                "rejects_dir": join(out, DECODE_REJECTS_DIR),
                "autoencoder": opts.autoencoder,
                "patch": opts.patch,
                "out": out,
                "decode_timeout_s": opts.decode_timeout_s,
                "scratch": opts.scratch,
                "curate": opts.curate,
                "image_conditioning": opts.image_conditioning,
            },
        )
    return _vae_stages(ds, opts, out, rows, concurrency, gpus)


def _plan_stage(scan: ManifestScan, opts: PrepareOptions, out: str, done: Any, cpus: int) -> Any:
    """Manifest rows grouped by source file, then probed: one row per clip to write, with all its captions."""
    import ray
    from ray.data import TaskPoolStrategy

    chunks = scan.chunks(math.ceil(scan.num_rows / (MANIFEST_CHUNKS_PER_CPU * cpus)))
    # The scan goes by value: a task that calls ray.get gives its CPU back while it waits, and Ray starts
    # another worker process (seconds of imports on a small machine) for the next task. It is small (the
    # manifest's path and header; a folder manifest's file list). The resume filter, only on resumes, goes
    # by reference so the driver never holds it.
    scan_light = replace(scan, offsets=[])
    # Every row of a source in one block: one probe per file, one clip per (file, start) with all its captions.
    # Plain tasks, not Ray Data's sort (group.py says why); this waits for the grouped blocks (the barrier).
    ds = ray.data.from_arrow_refs(group_by_source(scan_light, chunks, done))
    return ds.map_batches(
        plan_block,
        fn_kwargs={
            "buckets": opts.buckets,
            "fps": opts.fps,
            "clips_per_video": opts.clips_per_video,
            "stride_s": opts.stride_s,
            "rejects_dir": join(out, DECODE_REJECTS_DIR),
            "done": [done],
            "decode_timeout_s": opts.decode_timeout_s,
            "guards": Guards(opts.max_upscale, opts.max_fps_ratio),
            "scratch": opts.scratch,
            "curate": opts.curate,
        },
        # One probing task per CPU at most, so the caption and decode stages get CPUs while files are probed.
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
        compute=TaskPoolStrategy(size=max(1, cpus)),
    )


def _caption_stage(ds: Any, opts: PrepareOptions, gpus: int) -> Any:
    """Captions: an actor pool (one actor per GPU when the cluster has GPUs); on a CPU-only cluster plain
    tasks that keep the encoder loaded per worker process, unless --caption-actors asks for actors."""
    from ray.data import ActorPoolStrategy

    actors = opts.caption_actors if opts.caption_actors is not None else gpus
    if actors:
        return ds.map_batches(
            EmbedCaptions,
            fn_constructor_kwargs={"config": opts.text_encoder},
            batch_size=CAPTION_ROWS,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=actors),
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
        )
    return ds.map_batches(
        embed_task,
        fn_kwargs={"config": opts.text_encoder},
        batch_size=CAPTION_ROWS,
        batch_format="pyarrow",
        num_cpus=1,
    )


def _vae_stages(ds: Any, opts: PrepareOptions, out: str, rows: int, concurrency: dict[str, Any], gpus: int) -> Any:
    """With an autoencoder: decode to pixels (CPU tasks) -> encode (GPU actors) -> write shards (light tasks)."""
    from ray.data import ActorPoolStrategy

    ds = ds.map_batches(
        decode_to_pixels,
        batch_size=rows,
        batch_format="pyarrow",
        num_cpus=1,
        **concurrency,
        fn_kwargs={
            "rejects_dir": join(out, DECODE_REJECTS_DIR),
            "decode_timeout_s": opts.decode_timeout_s,
            "scratch": opts.scratch,
            "curate": opts.curate,
        },
    )
    ds = ds.map_batches(
        EncodeClips,
        fn_constructor_kwargs={
            "autoencoder": opts.autoencoder,
            "patch": opts.patch,
            "batch_clips": opts.vae_batch_clips,
            "image_conditioning": opts.image_conditioning,
        },
        batch_size=rows,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, gpus) if gpus else 1),
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
    )
    return ds.map_batches(
        write_rows,
        batch_size=opts.rows_per_file,
        batch_format="pyarrow",
        num_cpus=0.25,
        fn_kwargs={"out": out, "rows_per_file": opts.rows_per_file},
    )


def _drain(ds: Any, progress: bool, num_rows: int, t0: float) -> tuple[int, int]:
    """Run the plan; the driver only sees one small row per shard written. Returns (clips, shards)."""
    written = shards = 0
    last = 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        written += sum(batch.column("rows").to_pylist())
        shards += batch.num_rows
        now = time.perf_counter()
        if progress and now - last > 2:
            last = now
            console.status(
                f"prepare: {written} clips in {shards} shards ({written / (now - t0):.1f} clips/s; manifest "
                f"{num_rows} rows)"
            )
    return written, shards


def _append_stats(out: str, stats: str, written: int, shards: int, seconds: float) -> None:
    fs, p = filesystem(join(out, STATS_LOG))
    with fs.open(p, "ab" if not is_uri(out) else "wb") as f:  # object stores cannot append: the last run's stats
        f.write(
            (
                f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {written} clips, {shards} shards, {seconds:.1f}s\n{stats}\n"
            ).encode()
        )


def _curation(opts: PrepareOptions, sums: list[dict[str, Any]]) -> dict[str, Any]:
    """dataset.json's account of what the guards saw: captions cut, the sources' frame rates, repeated frames."""
    fps = [s["source_fps"] for s in sums if s["source_fps"]]
    rows = sum(s["rows"] for s in sums if s["source_fps"])
    return {
        "text_truncated": sum(s["text_truncated"] for s in sums),
        "source_fps": {
            "min": round(min(f[0] for f in fps), 4),
            "max": round(max(f[1] for f in fps), 4),
            "mean": round(sum(f[2] for f in fps) / rows, 4),
        }
        if fps
        else None,
        "clips_with_repeated_frames": sum(s["repeated_clips"] for s in sums),
        "max_upscale": opts.max_upscale,
        "max_fps_ratio": opts.max_fps_ratio,
    }


def _image_info(opts: PrepareOptions, schema: Any) -> dict[str, Any]:
    """dataset.json's `image_conditioning`: what conditions each clip, read back from a shard's schema (what training
    checks against an image-to-video model: frames per clip, condition channels, feature tokens and width)."""
    cond = opts.image_conditioning
    per_token = schema.field("image_condition").type.value_type.list_size  # (mask + latent channels) x pt x ph x pw
    info: dict[str, Any] = {
        "images": cond.images,
        "channels": per_token // math.prod(opts.patch),
        "image_encoder": None if cond.encoder is None else to_dict(cond.encoder),
    }
    if "image_features" in schema.names:
        features = schema.field("image_features").type
        info.update(image_tokens=features.list_size // cond.images, image_dim=features.value_type.list_size)
    return info


def _finish(
    opts: PrepareOptions,
    out: str,
    scan: ManifestScan,
    grids: dict[str, Any],
    channels: int,
    rejected: tuple[int, int],
    elapsed: float,
) -> dict[str, Any]:
    """Read back what was written, write dataset.json, warn about cut captions and print the one-line result."""
    num_rejected, _ = rejected
    bucket_infos, sums = _bucket_infos(opts, out, grids)
    num_clips = sum(bi["num_clips"] for bi in bucket_infos)
    if num_clips == 0:
        raise PrepareError(
            f"no clips written: all {num_rejected} inputs were rejected; reasons in {join(out, REJECTS)}"
        )
    info = _dataset_info(opts, out, scan, channels, bucket_infos, sums, rejected, elapsed)
    write_json(join(out, DATASET_INFO), info)
    if info["text_truncated"]:
        print(
            f"warning: {info['text_truncated']} captions were longer than the text encoder's "
            f"{opts.text_encoder.max_length} tokens and were cut (raise --max-text-length; per clip: the "
            "text_truncated column)",
            file=sys.stderr,
        )
    print(f"{num_clips} clips written, {num_rejected} inputs rejected ({out}; {elapsed:.1f}s)")
    return info


def _bucket_infos(
    opts: PrepareOptions, out: str, grids: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """dataset.json's `buckets` entries, and each bucket's shard summary (rows, captions cut, source fps)."""
    bucket_infos, sums = [], []
    for b in opts.buckets:
        sums.append(shard_summary(join(out, b.name)))
        bucket_infos.append(
            {
                "frames": b.frames,
                "height": b.height,
                "width": b.width,
                "name": b.name,
                "grid": list(grids[b.name]),
                "num_clips": sums[-1]["rows"],
                "path": b.name,
            }
        )
    return bucket_infos, sums


def _dataset_info(
    opts: PrepareOptions,
    out: str,
    scan: ManifestScan,
    channels: int,
    bucket_infos: list[dict[str, Any]],
    sums: list[dict[str, Any]],
    rejected: tuple[int, int],
    elapsed: float,
) -> dict[str, Any]:
    """dataset.json: the buckets, shapes, encoders and columns training checks against, read from the first shard."""
    import pyarrow.parquet as pq

    num_rejected, clips_rejected = rejected
    first = next(f for bi in bucket_infos for f in shard_files(join(out, bi["path"])))
    fs, p = filesystem(first)
    schema = pq.read_schema(p, filesystem=fs)
    text_dim = schema.field("text_pooled").type.list_size
    image_columns = [c for c in IMAGE_CONDITION_COLUMNS if opts.image_conditioning and c in schema.names]
    pt, ph, pw = opts.patch
    return {
        "format_version": FORMAT_VERSION,
        "num_clips": sum(bi["num_clips"] for bi in bucket_infos),
        "num_rejected": num_rejected,
        "num_clips_rejected": clips_rejected,
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
        "manifest": {"path": str(opts.manifest), "sha256": scan.sha256, "rows": scan.num_rows},
        "clips_per_video": opts.clips_per_video,
        "stride_s": opts.stride_s,
        **_curation(opts, sums),
        **({"curate": curate_summary([join(out, b.name) for b in opts.buckets])} if opts.curate else {}),
        **({"image_conditioning": _image_info(opts, schema)} if opts.image_conditioning else {}),
        "columns": list(COLUMNS) + (list(CURATE_COLUMNS) if opts.curate else []) + image_columns,
        "dtypes": {
            **DTYPES,
            **(CURATE_DTYPES if opts.curate else {}),
            **{c: IMAGE_CONDITION_DTYPES[c] for c in image_columns},
        },
        "layout": "one folder per bucket, OUT/<frames>x<height>x<width>/part-*.parquet",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 2),
    }
