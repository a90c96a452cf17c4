r"""`sora data prepare`: videos + captions -> Parquet shards of patch tokens and text embeddings (Ray Data).

    sora data prepare --manifest data/shapes/captions.jsonl --out data/prepared --resolution 32 --frames 8 --fps 8
    sora data prepare --manifest clips.csv --out data/mixed --buckets 1x32x32,8x32x32,8x32x64 --clips-per-video 4
    ray job submit --working-dir . -- python -m pipelines.data.prepare \
        --manifest /mnt/videos/manifest.jsonl --out /mnt/prepared/stage2 --resolution 256 --frames 16 --fps 8

One streaming Ray Data plan from the manifest to the shards (see pipeline.py):

    manifest (local or s3://...) --scan on the driver: sha256, rows, <= 4096 chunk offsets
      --parse chunks (tasks; a resume drops finished lines) --group by source (the one barrier, small rows)
      --plan (tasks: probe each file once, clips with all their captions; rejects to OUT/_rejects/)
      --captions (actors, one per GPU; on CPU-only clusters tasks: batched, deduplicated by caption hash, fp16)
      --decode + patchify + write (tasks; identity autoencoder)                 -> OUT/<F>x<H>x<W>/part-*.parquet
        or decode (tasks) --encode (VAE actors, one per GPU) --write (tasks)

The driver never holds the manifest, the clips or the embeddings (its peak memory does not grow with the
manifest: benchmarks/bench_prepare_driver_rss_ratio_50k_over_500.py), and clips are decoded while later
files are still being probed. Probing and decoding run in a per-worker decoder child process
(isolate.py): a file that crashes or hangs FFmpeg/decord becomes a reject ("decoder crashed" / "decoder
timed out", --decode-timeout), and the run finishes. Remote inputs are fetched into a temporary file for
the one stage that needs them and removed (a remote MP4/MOV is probed by byte ranges, not fetched);
throttling and dropped connections are retried with backoff, then the input is rejected with the reason
(storage.py).

On disk (format version 2), one folder per bucket, one row per clip:

    OUT/dataset.json                 counts, buckets, patch size, text encoder, autoencoder, manifest sha256
    OUT/rejects.jsonl                {"line", "path", "source", "reason", "detail"} per unusable input
    OUT/stats.log                    ds.stats() of every run
    OUT/_run.json                    the run's settings and their hash (what a resume must match)
    OUT/null_prompt.safetensors      the embedding of "" for models that need it (null_prompt.py)
    OUT/_rejects/*.jsonl             each stage's rejects (merged into rejects.jsonl; read by a resume)
    OUT/_damaged/                    shards a resume could not parse, set aside (their clips written again)
    OUT/<F>x<H>x<W>/part-*.parquet   columns:
        clip_id      string           sha1(source + start_s)[:16]: stable across runs and machines' resumes
        source       string           resolved path or URI of the input
        start_s      float64          clip start in the source, seconds
        fps          float32          frame rate of the clip (the requested --fps, else the source's)
        caption      string
        patches      (N, P) float32   model-space tokens, sora_model.patch layout (t-major, (C, pt, ph, pw) per token)
        grid         (3,) int32       (T', H', W') token grid, N = T' * H' * W'
        text_tokens  (l, D) float16   text encoder tokens at the caption's true length l <= L (zero-padded to
                                      L at load); half precision halves the disk, cast when training
        text_mask    (L,) bool        True where a text token is real
        text_pooled  (D,) float32     pooled caption embedding
        extra_captions, extra_text_tokens, extra_text_mask, extra_text_pooled
                     lists            a clip's other captions (a manifest that lists the clip again with
                                      another caption: MSR-VTT-style multi-caption data), each as above;
                                      the loader draws one caption per read
        lines, line_clips  lists      manifest lines whose captions the clip carries, and how many clips
                                      each line planned (what a resume counts)
        source_fps   float32          the source file's average frame rate
        repeated_frames  int32        clip frames that repeat the previous source frame (fps above the source's)
        text_truncated   int32        the clip's captions that were cut to max_length tokens
        scene, motion, phash          --curate only: scene index, motion score, perceptual hashes (curate.py)
        image_condition  (N, Pc) float32  --image-conditioning only: mask + VAE latents of the clip's first (FLF2V: and
                                      last) frame's conditioning video, patchified like `patches` (condition.py)
        image_features   (Li, Di) float16 --image-conditioning only: the export's image encoder's features of them
    Tensor columns are plain Arrow nested lists, fixed-size but for text_tokens' length (no Ray extension
    types), so any Parquet reader can open them; `pipelines.data.load` gives them back as arrays of the shapes above.

Guards: an input that would be scaled up more than `--max-upscale` (default 1: never) to fill its bucket is
rejected as "upscaled"; one whose fps is below `--fps` by more than `--max-fps-ratio` (default 1.5) is
rejected as "low fps" (nearest-frame sampling would repeat its frames). Rotation metadata is applied when
decoding (sora_model.video). Captions longer than the encoder's max_length are counted in dataset.json
(`text_truncated`) with one warning.

Image inputs (PNG/JPEG/...) are one-frame clips and only go to one-frame buckets. A video goes to the
multi-frame bucket nearest its aspect ratio among those it has enough frames for (most frames first);
videos give one-frame clips only when every bucket is one frame (`--frames 1`). Resize is short-side
then centre crop.

Resuming: every file appears whole or not at all (a local file is written aside and renamed; an S3 PUT
is atomic) and is named by a hash of its content, so a retried task rewrites its file. Re-running the
same command is a filter on what is written: manifest lines whose clips are all in shards or rejected, or
that were rejected whole, are dropped before probing (not probed again, no reject row written twice), and
written or rejected clips of other lines are dropped after planning. A clip that fails to decode is a reject
of that clip only (its row in rejects.jsonl names its `clip_id`): the video's other clips are still made.
A failure of the run's own storage (disk full, I/O error, a store unreachable after retries) stops the run
with one line and rejects nothing; the null prompt (when the model needs one) is written first. A shard that does not
parse is moved to `_damaged/` and its clips are written again. `_run.json` pins the settings (a different setting
refuses to resume), and `dataset.json` is only written once the run is done.

Modules, one idea each (this package re-exports what callers use):

    options.py    constants of the format, Bucket, PrepareOptions, PrepareError
    args.py       the command line -> PrepareOptions (with --from-export applied)
    manifest.py   JSONL / CSV / folder manifests: streaming scan, chunks parsed by tasks
    storage.py    local paths and fsspec URIs, temporary downloads, retries with backoff
    isolate.py    the decoder child process: crashes and hangs become rejects
    probe.py      probe a file once, plan the clips of all its rows (several captions per clip) or reject
    decode.py     frames of a clip, resized and centre-cropped
    reasons.py    an exception raised reading an input -> the reject's reason and detail
    encode.py     autoencoder + patchify -> shard rows; VAE batches sized by bytes
    captions.py   the caption actor stage: batched, hash-deduplicated, fp16
    group.py      every row of a source in one block: a hash partition in plain tasks
    shards.py     atomic shards and reject files, the resume filter
    condition.py  --image-conditioning: each clip's image-to-video condition (sora_model.i2v_condition)
    state.py      the output folder: overwrite, refuse or resume
    pipeline.py   the run, top to bottom
    from_export.py  --from-export: a model's own text encoder, autoencoder and patch (e.g. a converted Wan2.1)
"""

from pipelines.data.prepare.args import options_from_args
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
    StorageFailed,
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
    "StorageFailed",
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
