"""Encoding clips: pixels -> autoencoder -> patch tokens, as Arrow rows of the shard format.

Two shapes of the same work:
- identity autoencoder (pixels are the model space): `decode_encode_write`, one stateless task per batch
  that decodes, patchifies and writes its shards. Nothing crosses processes, no actor has to start.
- a diffusers VAE (weights to load once, a GPU to feed): `decode_to_pixels` tasks, then `EncodeClips`
  actors (one per GPU), then `write_rows` tasks. The actor cuts what it gets into sub-batches sized by
  `vae_batch_clips` (on a GPU: from the device's free memory and a per-clip activation estimate; on CPU:
  VAE_BATCH_BYTES of float input; `--vae-batch-clips` overrides) and converts uint8 to float on the device,
  so a 64-frame 1024x1024 batch is a few GB of bytes crossing the bus, never a 50 GB float tensor built on the host.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pipelines.data.prepare.curate import CURATE_COLUMNS, append_clip_columns
from pipelines.data.prepare.decode import decode_rows
from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S
from pipelines.data.prepare.options import (
    DECODE_BATCH_ROWS,
    GPU_DTYPE,
    IMAGE_CONDITION_COLUMNS,
    TOKENS_PAD_KEY,
    Bucket,
    ImageConditioning,
)
from pipelines.data.prepare.shards import write_rejects, write_shard
from pipelines.data.prepare.storage import LocalFiles
from sora_model.config import AutoencoderConfig

VAE_BATCH_BYTES = 2 << 30
"""Float input bytes per autoencoder call at most (2 GB: a 16x512x512 clip is 50 MB at fp32, so 40 of
them; a 64x1024x1024 clip is 805 MB, so 2): activations scale with it and must fit beside the weights.
The CPU budget; on a GPU the batch follows the device's memory (`vae_batch_clips`)."""
VAE_PEAK_BYTES_PER_VALUE = 160
"""Peak device bytes per input value (frames x height x width x 3) of a clip in one encode call, everything in
(activations, the uint8 and float copies of the input, cuDNN workspaces): Wan 2.1's VAE in bf16 peaked at 76.4 GiB
for 160 clips of 17x256x256 on an H200 (153 B per value; benchmarks/RESULTS.md, gpu_prepare), and at 9.6 GiB for
13 clips of 33x480x832 (19 B: its causal 4-frame chunks keep activations from growing with the frames). The larger
one, rounded up, so a batch fits whatever the shape; a VAE without temporal chunks sits nearer to it."""
VAE_DEVICE_FRACTION = 0.85
"""Share of the device memory free once the weights are loaded that one encode call may take: the rest absorbs
the allocator's fragmentation and the output latents."""
PASS_THROUGH = (
    "clip_id",
    "source",
    "start_s",
    "fps",
    "caption",
    "text_tokens",
    "text_mask",
    "text_pooled",
    "extra_captions",
    "extra_text_tokens",
    "extra_text_mask",
    "extra_text_pooled",
    "lines",
    "line_clips",
    "source_fps",
    "repeated_frames",
    "text_truncated",
)
"""Plan columns that go to the shard as they are (the order of the shard's columns, tokens inserted)."""
DECODE_COLUMNS = ["clip_id", "source", "path", "start_s", "indices", "lines", "line_clips"]
"""Plan columns the decoder reads (a clip's reject names its id and its lines' clip counts)."""


def _fixed_list(values: np.ndarray, item_type: Any) -> Any:
    """(B, d1, ..., dk) ndarray -> Arrow array of nested fixed-size lists, zero-copy for numeric types."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type)
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def row_schema(n: int, p: int, length: int, dim: int) -> Any:
    """The first ten columns of a shard (what every reader of the format knows)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("start_s", pa.float64()),
            ("fps", pa.float32()),
            ("caption", pa.string()),
            ("patches", pa.list_(pa.list_(pa.float32(), p), n)),
            ("grid", pa.list_(pa.int32(), 3)),
            ("text_tokens", pa.list_(pa.list_(pa.float16(), dim))),  # its true length; padded to `length` at load
            ("text_mask", pa.list_(pa.bool_(), length)),
            ("text_pooled", pa.list_(pa.float32(), dim)),
        ]
    )


def shard_table(
    plans: Any, tokens: np.ndarray, grid: tuple[int, int, int], condition: dict[str, np.ndarray] | None = None
) -> Any:
    """Plans (with text columns) + tokens (B, N, P) float32 -> the shard's Arrow table; a curated run's plans
    (with `motion`) add the curation columns at the end, and `condition` (`condition.ImageConditioner`'s arrays) the
    image-conditioning columns after them."""
    import pyarrow as pa

    b = plans.num_rows
    arrays, names = [], []
    curated = CURATE_COLUMNS if "motion" in plans.column_names else ()
    for name in (*PASS_THROUGH, *curated):
        col = plans.column(name)
        if name == "start_s":
            col = col.cast(pa.float64())
        elif name == "fps":
            col = col.cast(pa.float32())
        arrays.append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        names.append(name)
        if name == "caption":
            arrays += [
                _fixed_list(tokens.astype(np.float32, copy=False), pa.float32()),
                _fixed_list(np.broadcast_to(np.asarray(grid, np.int32), (b, 3)), pa.int32()),
            ]
            names += ["patches", "grid"]
    for name in IMAGE_CONDITION_COLUMNS:
        if condition is not None and name in condition:
            values = condition[name]
            arrays.append(_fixed_list(values, pa.float16() if values.dtype == np.float16 else pa.float32()))
            names.append(name)
    # Caption tokens are stored at their true length; the field says what length they are padded to at load, so
    # a reader that does not read text_mask pads every shard alike (pipelines.data.load).
    pad = {TOKENS_PAD_KEY: str(plans.schema.field("text_mask").type.list_size)}
    fields = [
        pa.field(n, a.type, metadata=pad if n in ("text_tokens", "extra_text_tokens") else None)
        for n, a in zip(names, arrays)
    ]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def vae_batch_clips(clip_shape: tuple[int, ...], free_device_bytes: int | None, override: int | None = None) -> int:
    """Clips per autoencoder call, at least one: `override` (--vae-batch-clips) when given; on a GPU
    (`free_device_bytes`: its free memory with the weights loaded) VAE_DEVICE_FRACTION of that over the per-clip
    estimate, VAE_PEAK_BYTES_PER_VALUE x the clip's values (F x H x W x 3); on CPU (None) VAE_BATCH_BYTES of
    float32 input, as before. On an 80 GB H100 (79 GiB free) at 17x256x256: 134 clips (160 peaked at 76 GiB on an
    H200)."""
    if override is not None:
        return max(1, int(override))
    values = int(np.prod(clip_shape))
    if free_device_bytes is None:
        return max(1, VAE_BATCH_BYTES // (values * 4))
    return max(1, int(free_device_bytes * VAE_DEVICE_FRACTION) // (values * VAE_PEAK_BYTES_PER_VALUE))


class Patchify:
    """pixels (B, F, H, W, 3) uint8 -> autoencoder -> tokens (B, N, P) float32, on the best device here."""

    def __init__(
        self,
        autoencoder: AutoencoderConfig,
        patch: tuple[int, int, int],
        batch_clips: int | None = None,
        image_conditioning: ImageConditioning | None = None,
    ):
        import torch

        from sora_model.autoencoder import build_autoencoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autoencoder = build_autoencoder(autoencoder).to(self.device).eval()
        vae = getattr(self.autoencoder, "vae", None)  # the diffusers model; the normalisation buffers stay fp32
        if vae is not None and self.device.type == "cuda":
            vae.to(getattr(torch, GPU_DTYPE))
        self.patch = patch
        self.batch_clips = batch_clips
        # Measured once, with the weights in place: one actor per GPU, so nothing else of ours takes from it.
        self.free_device_bytes = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.oom_cap: dict[tuple[int, ...], int] = {}
        """Clips per call that a CUDA out-of-memory error cut a clip shape to (halving until it fits)."""
        self.conditioner = None
        """`--image-conditioning`: each clip's image-to-video condition, on the same device and VAE."""
        if image_conditioning is not None:
            from pipelines.data.prepare.condition import ImageConditioner

            self.conditioner = ImageConditioner(
                image_conditioning,
                self.autoencoder,
                self.device,
                patch,
                lambda shape: min(self.rows_per_call(shape), self.oom_cap.get(shape[1:], shape[0])),
            )

    def condition(self, pixels: np.ndarray) -> dict[str, np.ndarray] | None:
        """The clips' image-to-video condition columns; None when the run stores none."""
        return None if self.conditioner is None else self.conditioner(pixels)

    def rows_per_call(self, pixels_shape: tuple[int, ...]) -> int:
        """Clips per autoencoder call (`vae_batch_clips` of one clip's shape)."""
        return vae_batch_clips(tuple(pixels_shape[1:]), self.free_device_bytes, self.batch_clips)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        import torch

        from sora_model.autoencoder import pixels_to_model
        from sora_model.patch import patch_grid, patchify

        step = min(self.rows_per_call(pixels.shape), self.oom_cap.get(pixels.shape[1:], len(pixels)))
        parts, grid, i = [], (0, 0, 0), 0
        with torch.no_grad():
            while i < len(pixels):
                # uint8 crosses to the device (4x less than float) and becomes float there.
                chunk = torch.from_numpy(np.ascontiguousarray(pixels[i : i + step])).to(self.device)  # (b, F, H, W, 3)
                try:
                    latents = self.autoencoder.encode(pixels_to_model(chunk)).float()  # (b, C, T', H', W')
                except torch.cuda.OutOfMemoryError:
                    if step == 1:
                        raise
                    # The estimate was short for this VAE: half the clips, kept for this shape from now on.
                    del chunk
                    torch.cuda.empty_cache()
                    step = self.oom_cap[pixels.shape[1:]] = max(1, min(step, len(pixels) - i) // 2)
                    continue
                parts.append(patchify(latents, self.patch).cpu().numpy())  # (b, N, P)
                grid = patch_grid(tuple(latents.shape[2:]), self.patch)
                i += len(chunk)
        return np.concatenate(parts), grid


_STATE: dict[str, Any] = {}
"""Per worker process: the identity Patchify and the LocalFiles, built once and reused by every task."""


def _process_state(
    autoencoder: AutoencoderConfig,
    patch: tuple[int, int, int],
    scratch: str | None,
    image_conditioning: ImageConditioning | None = None,
) -> tuple[Patchify, LocalFiles]:
    key = json.dumps([str(autoencoder), list(patch), str(image_conditioning)])
    if _STATE.get("key") != key:
        _STATE.update(key=key, patchify=Patchify(autoencoder, patch, image_conditioning=image_conditioning))
    if _STATE.get("files") is None or _STATE["files"].scratch != scratch:
        _STATE["files"] = LocalFiles(scratch)
    return _STATE["patchify"], _STATE["files"]


def take_rows(table: Any, rows: Any) -> Any:
    """table.take(rows), made safe: pyarrow 26's take on a *sliced* nested fixed-size list of float16 (our
    text tokens, in every batch Ray Data cuts from a block) reads the wrong rows, so columns are compacted
    to offset 0 first."""
    import pyarrow as pa

    rows = pa.array(np.asarray(rows, dtype=np.int64))
    columns = []
    for col in table.columns:
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        columns.append((pa.concat_arrays([arr]) if arr.offset else arr).take(rows))
    return pa.Table.from_arrays(columns, schema=table.schema)


def by_bucket(table: Any) -> dict[str, Any]:
    """{bucket name: the rows of that bucket}, without the bucket column."""
    names = np.asarray(table.column("bucket").to_pylist(), dtype=object)
    rest = table.drop_columns(["bucket"])
    return {str(n): take_rows(rest, np.flatnonzero(names == n)) for n in dict.fromkeys(names.tolist())}


def decode_encode_write(
    table: Any,
    rejects_dir: str,
    autoencoder: AutoencoderConfig,
    patch: tuple[int, int, int],
    out: str,
    decode_timeout_s: float = DECODE_TIMEOUT_S,
    scratch: str | None = None,
    curate: bool = False,
    image_conditioning: ImageConditioning | None = None,
) -> Any:
    """Identity path: decode, patchify and write one shard per bucket in this batch (with `curate`, the clips'
    motion and hashes from the same pixels; with `image_conditioning`, their image-to-video condition).

    Returns {bucket, shard, rows} per shard written (what the driver counts for progress)."""
    import pyarrow as pa

    patchify, files = _process_state(autoencoder, patch, scratch, image_conditioning)
    written: dict[str, list] = {"bucket": [], "shard": [], "rows": []}
    rejects = []
    for name, plans in by_bucket(table).items():
        kept, pixels, bad = decode_rows(
            plans.select(DECODE_COLUMNS).to_pylist(), Bucket.parse(name), files, decode_timeout_s=decode_timeout_s
        )
        rejects += bad
        if not kept:
            continue
        tokens, grid = patchify(pixels)
        rows = take_rows(plans, kept)
        rows = append_clip_columns(rows, pixels) if curate else rows
        shard = shard_table(rows, tokens, grid, patchify.condition(pixels))
        written["bucket"].append(name)
        written["shard"].append(write_shard(shard, os.path.join(out, name)))
        written["rows"].append(shard.num_rows)
    write_rejects(rejects, rejects_dir, "decode")
    return pa.table(
        {
            "bucket": pa.array(written["bucket"], pa.string()),
            "shard": pa.array(written["shard"], pa.string()),
            "rows": pa.array(written["rows"], pa.int64()),
        }
    )


def decode_to_pixels(
    table: Any,
    rejects_dir: str,
    decode_timeout_s: float = DECODE_TIMEOUT_S,
    scratch: str | None = None,
    curate: bool = False,
) -> Any:
    """VAE path, first step: plans -> the same rows with `pixels` (flat uint8 list) for the encode actors (with
    `curate`, and the clips' motion and hashes, computed here where the pixels are)."""
    import pyarrow as pa

    if _STATE.get("files") is None or _STATE["files"].scratch != scratch:
        _STATE["files"] = LocalFiles(scratch)
    files = _STATE["files"]
    parts, rejects = [], []
    for name, plans in by_bucket(table).items():
        kept, pixels, bad = decode_rows(
            plans.select(DECODE_COLUMNS).to_pylist(), Bucket.parse(name), files, decode_timeout_s=decode_timeout_s
        )
        rejects += bad
        if kept:
            rows = take_rows(plans, kept).drop_columns(["indices"])
            if curate:
                rows = append_clip_columns(rows, pixels)
            flat = pa.array(pixels.reshape(-1), pa.uint8())
            offsets = pa.array(np.arange(len(kept) + 1, dtype=np.int64) * int(np.prod(pixels.shape[1:])), pa.int64())
            rows = rows.append_column("pixels", pa.LargeListArray.from_arrays(offsets, flat))
            parts.append(rows.append_column("bucket", pa.array([name] * len(kept), pa.string())))
    write_rejects(rejects, rejects_dir, "decode")
    return pa.concat_tables(parts) if parts else None


class EncodeClips:
    """Ray Data actor (one per GPU): decoded rows -> shard rows, with their bucket, for `write_rows`."""

    def __init__(
        self,
        autoencoder: AutoencoderConfig,
        patch: tuple[int, int, int],
        batch_clips: int | None = None,
        image_conditioning: ImageConditioning | None = None,
    ):
        self.patchify = Patchify(autoencoder, patch, batch_clips, image_conditioning)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        parts = []
        for name, rows in by_bucket(table).items():
            b = Bucket.parse(name)
            flat = rows.column("pixels").combine_chunks().flatten().to_numpy()
            pixels = flat.reshape(rows.num_rows, b.frames, b.height, b.width, 3)  # (B, F, H, W, 3) uint8
            tokens, grid = self.patchify(pixels)
            shard = shard_table(rows.drop_columns(["pixels"]), tokens, grid, self.patchify.condition(pixels))
            parts.append(shard.append_column("bucket", pa.array([name] * shard.num_rows, pa.string())))
        return pa.concat_tables(parts)


def write_rows(table: Any, out: str, rows_per_file: int) -> Any:
    """VAE path, last step: shard rows -> shards of at most `rows_per_file` rows, split evenly, per bucket."""
    import math

    import pyarrow as pa

    written: dict[str, list] = {"bucket": [], "shard": [], "rows": []}
    for name, rows in by_bucket(table).items():
        n_files = math.ceil(rows.num_rows / rows_per_file)
        bounds = [round(k * rows.num_rows / n_files) for k in range(n_files + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            written["bucket"].append(name)
            written["shard"].append(write_shard(rows.slice(lo, hi - lo), os.path.join(out, name)))
            written["rows"].append(hi - lo)
    return pa.table(
        {
            "bucket": pa.array(written["bucket"], pa.string()),
            "shard": pa.array(written["shard"], pa.string()),
            "rows": pa.array(written["rows"], pa.int64()),
        }
    )


def batch_rows(clip_bytes: int, rows_per_file: int, batch_bytes: int) -> int:
    """Clips per decode batch (and so per shard on the identity path): at most `rows_per_file` and
    `batch_bytes` of decoded pixels, at least one."""
    return max(1, min(rows_per_file, DECODE_BATCH_ROWS, batch_bytes // max(1, clip_bytes)))
