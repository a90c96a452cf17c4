"""Encoding clips: pixels -> autoencoder -> patch tokens, as Arrow rows with the caption's embeddings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipelines.data.prepare.decode import DecodeClips
from pipelines.data.prepare.options import FUSED_BATCH_BYTES, Bucket
from pipelines.data.prepare.shards import write_shard
from sora_model.config import AutoencoderConfig


def row_schema(n: int, p: int, length: int, dim: int) -> Any:
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
            ("text_tokens", pa.list_(pa.list_(pa.float16(), dim), length)),
            ("text_mask", pa.list_(pa.bool_(), length)),
            ("text_pooled", pa.list_(pa.float32(), dim)),
        ]
    )


def _fixed_list(values: np.ndarray, item_type: Any) -> Any:
    """(B, d1, ..., dk) ndarray -> Arrow array of nested fixed-size lists, zero-copy for numeric types."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type)
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


class EncodeClips:
    """Ray Data actor: pixels -> autoencoder -> patchify -> Arrow rows with the caption's text embeddings.

    Identity runs on CPU next to decoding; a diffusers VAE gets its own GPU actors (`num_gpus=1`).
    """

    def __init__(self, autoencoder: AutoencoderConfig, patch: tuple[int, int, int], text_table: list[Any]):
        import torch

        from sora_model.autoencoder import build_autoencoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autoencoder = build_autoencoder(autoencoder).to(self.device).eval()
        self.patch = patch
        table = _text_table(text_table[0])
        self.text = table
        self.row_of = {c: i for i, c in enumerate(table["captions"])}

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa
        import torch

        from sora_model.autoencoder import pixels_to_model
        from sora_model.patch import patch_grid, patchify

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))  # (B, F, H, W, 3) uint8
        with torch.no_grad():
            video = pixels_to_model(pixels).to(self.device)  # (B, 3, F, H, W)
            latents = self.autoencoder.encode(video).float()  # (B, C, T', H', W')
            tokens = patchify(latents, self.patch).cpu().numpy()  # (B, N, P)
        grid = np.asarray(patch_grid(tuple(latents.shape[2:]), self.patch), dtype=np.int32)
        rows = np.asarray([self.row_of[str(c)] for c in batch["caption"]], dtype=np.int64)
        b = len(rows)
        text_tokens = self.text["tokens"][rows]  # (B, L, D) float16
        schema = row_schema(tokens.shape[1], tokens.shape[2], text_tokens.shape[1], text_tokens.shape[2])
        columns = [
            pa.array([str(x) for x in batch["clip_id"]], pa.string()),
            pa.array([str(x) for x in batch["source"]], pa.string()),
            pa.array(np.asarray(batch["start_s"], dtype=np.float64)),
            pa.array(np.asarray(batch["fps"], dtype=np.float32)),
            pa.array([str(x) for x in batch["caption"]], pa.string()),
            _fixed_list(tokens.astype(np.float32, copy=False), pa.float32()),
            _fixed_list(np.broadcast_to(grid, (b, 3)), pa.int32()),
            _fixed_list(text_tokens, pa.float16()),
            _fixed_list(self.text["mask"][rows], pa.bool_()),
            _fixed_list(self.text["pooled"][rows], pa.float32()),
        ]
        return pa.Table.from_arrays(columns, schema=schema)


_TEXT_TABLES: dict[Any, dict[str, Any]] = {}
"""Per worker process: the run's text table, fetched from the object store once per run (keyed by its ref)."""


def _text_table(ref: Any) -> dict[str, Any]:
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _TEXT_TABLES:
        _TEXT_TABLES.clear()  # one run's table at a time
        _TEXT_TABLES[key] = ray.get(ref)
    return _TEXT_TABLES[key]


def decode_encode_write(
    batch: dict[str, np.ndarray],
    bucket: Bucket,
    rejects_dir: str,
    autoencoder: AutoencoderConfig,
    patch: tuple[int, int, int],
    text_table: list[Any],
    folder: str,
) -> dict[str, np.ndarray]:
    """DecodeClips, EncodeClips and one shard write in one stateless task, for autoencoders that need no
    weights loaded (identity): pixels and rows never cross processes, no actor has to start, and no
    writer task needs a worker process of its own (on a small machine, starting one costs seconds).
    Returns the shard written: {"shard": [name], "rows": [n]}, or empty when every clip was rejected."""
    table = EncodeClips(autoencoder, patch, text_table)(DecodeClips(bucket, rejects_dir)(batch))
    if not table.num_rows:
        return {"shard": np.asarray([], dtype=np.str_), "rows": np.asarray([], dtype=np.int64)}
    name = write_shard(table, folder)
    return {"shard": np.asarray([name], dtype=np.str_), "rows": np.asarray([table.num_rows], dtype=np.int64)}


def fused_rows_per_task(num_clips: int, clip_bytes: int, rows_per_file: int, workers: int) -> int:
    """Clips per decode-encode-write task (and so per shard): at most `rows_per_file` and FUSED_BATCH_BYTES
    of pixels, and few enough that every worker gets two tasks (equal tasks keep the cores busy to the end).
    Shards are therefore smaller than `rows_per_file` on small datasets, many CPUs or large clips."""
    return max(1, min(rows_per_file, FUSED_BATCH_BYTES // clip_bytes, math.ceil(num_clips / (2 * workers))))
