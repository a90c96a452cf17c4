"""`sora data prepare`: videos + captions -> Parquet shards of patch tokens and text embeddings (Ray Data).

    sora data prepare --manifest data/shapes/captions.jsonl --out data/prepared --resolution 32 --frames 8 --fps 8
    sora data prepare --manifest clips.csv --out data/mixed --buckets 1x32x32,8x32x32,8x32x64 --clips-per-video 4
    ray job submit --working-dir . -- python -m pipelines.data.prepare \
        --manifest /mnt/videos/manifest.jsonl --out /mnt/prepared/stage2 --resolution 256 --frames 16 --fps 8

The pipeline (probing is plain Ray tasks; every later step a Ray Data operator, with its progress bars):

    manifest rows --probe (Ray tasks)--> clip plans ---------------------------------- rejects.jsonl
                                       |  (metadata, materialised: it is small and read twice)
    unique captions --text encoder (one task, run while probing)--> embedding table (object store)
                                       |
    per bucket: plans --decode+resize+crop, identity autoencoder + patchify + text lookup, write (tasks)-->
                      OUT/<F>x<H>x<W>/part-<hash>.parquet, one shard per task     (streaming)
    with a diffusers VAE the decode tasks feed a GPU actor pool (autoencoder + patchify + text) and a
    ShardDatasink writes the shards instead.

Stateless stages run as Ray tasks, not actor pools: a task reuses a warm worker process, where each
actor pool would start processes and import torch and the video libraries again (seconds each on a
small machine, more than the work itself on a small dataset). Only the VAE, which has weights to
load once, keeps an actor pool; captions (a few thousand at most, usually) are embedded in one task
that loads the text encoder once and runs beside the probe; a very large caption set falls back to an
actor pool after probing.

On disk (format version 1), one folder per bucket, one row per clip:

    OUT/dataset.json                 counts, buckets, patch size, text encoder, autoencoder, manifest sha256
    OUT/rejects.jsonl                {"line", "path", "source", "reason", "detail"} per unusable input
    OUT/stats.log                    ds.stats() of every bucket's run
    OUT/<F>x<H>x<W>/part-*.parquet   columns:
        clip_id      string           sha1(source + start_s)[:16]: stable across runs and machines' resumes
        source       string           resolved path or URI of the input
        start_s      float64          clip start in the source, seconds
        fps          float32          frame rate of the clip (the requested --fps, else the source's)
        caption      string
        patches      (N, P) float32   model-space tokens, sora_model.patch layout (t-major, (C, pt, ph, pw) per token)
        grid         (3,) int32       (T', H', W') token grid, N = T' * H' * W'
        text_tokens  (L, D) float16   text encoder tokens (half precision halves the disk; cast when training)
        text_mask    (L,) bool        True where a text token is real
        text_pooled  (D,) float32     pooled caption embedding
    Tensor columns are plain Arrow nested fixed-size lists (no Ray extension types), so any Parquet reader
    can open them; `pipelines.data.load` gives them back as arrays of the shapes above.

Image inputs (PNG/JPEG/...) are one-frame clips and only go to one-frame buckets. A video goes to the
multi-frame bucket nearest its aspect ratio among those it has enough frames for (most frames first);
videos give one-frame clips only when every bucket is one frame (`--frames 1`). Resize is short-side
then centre crop.

Resuming: a shard appears atomically (written aside, then renamed) and holds whole clips, so after an
interruption the clips that exist are exactly those in complete shards. Re-running the same command
reads their clip ids, skips those clips and writes the rest; `_run.json` pins the settings (a different
setting refuses to resume), and `dataset.json` is only written once every bucket is done.

Modules, one idea each (this package re-exports what callers use):

    options.py    constants of the format, Bucket, PrepareOptions, PrepareError
    manifest.py   JSONL / CSV / folder manifests -> entries
    storage.py    inputs on local disk or behind fsspec URIs
    probe.py      probe an input, plan its clips (bucket, frame indices) or reject it
    decode.py     frames of a clip, resized and centre-cropped
    encode.py     autoencoder + patchify -> Arrow rows
    captions.py   the text encoder over unique captions
    shards.py     atomic Parquet shards, what a resume reads back
    state.py      the output folder: overwrite, refuse or resume
    pipeline.py   the run, top to bottom
"""

from pipelines.data.prepare.decode import resize_center_crop
from pipelines.data.prepare.encode import batch_rows, row_schema
from pipelines.data.prepare.manifest import read_manifest
from pipelines.data.prepare.options import (
    COLUMNS,
    DATASET_INFO,
    DEFAULT_PATCH,
    PARQUET_COMPRESSION,
    REJECTS,
    RUN_STATE,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    Bucket,
    PrepareError,
    PrepareOptions,
    options_from_args,
    parse_buckets,
)
from pipelines.data.prepare.pipeline import prepare
from pipelines.data.prepare.probe import choose_bucket, clip_id

__all__ = [
    "COLUMNS",
    "DATASET_INFO",
    "DEFAULT_PATCH",
    "PARQUET_COMPRESSION",
    "REJECTS",
    "RUN_STATE",
    "SHARD_PREFIX",
    "SHARD_SUFFIX",
    "Bucket",
    "PrepareError",
    "PrepareOptions",
    "choose_bucket",
    "clip_id",
    "batch_rows",
    "options_from_args",
    "parse_buckets",
    "prepare",
    "read_manifest",
    "resize_center_crop",
    "row_schema",
]
