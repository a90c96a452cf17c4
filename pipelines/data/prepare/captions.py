"""Caption embeddings, inside the stream: a stage between planning and decoding.

The stage is an actor pool (`EmbedCaptions`, one actor per GPU when the cluster has GPUs, or `--caption-actors`),
or on CPU-only clusters plain tasks (`embed_task`) that keep one `EmbedCaptions` loaded per worker process. Either
way the encoder is loaded once, takes batches of clip plans, embeds their captions deduplicated by caption hash
(within the batch, and across batches through the encoder's LRU cache, bounded by CAPTION_CACHE_BYTES and
CAPTION_CACHE_ENTRIES), and attaches the embeddings to the rows: tokens in half precision at each caption's true
length (format 2; padded at load), the pooled embedding in float32. No process ever holds a table of every
caption: memory is one batch plus the cache.

A clip's first caption fills `caption`, `text_tokens`, `text_mask` and `text_pooled` (what every reader
of the format knows); the others, for multi-caption clips, go to `extra_captions`, `extra_text_tokens`,
`extra_text_mask` and `extra_text_pooled` (lists, empty for most clips). The loader draws one of a
clip's captions each time it reads the row (`pipelines.data.load`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from pipelines.data.prepare.options import GPU_DTYPE, TEXT_BATCH_SIZE, TOKENS_PAD_KEY
from sora_model.config import TextEncoderConfig

CAPTION_CACHE_ENTRIES = 8192
"""Embeddings an actor keeps (LRU) at most: ~200 MB at 32 x 384 fp32 tokens (MiniLM); multi-caption rows and
repeated prompts of a dataset hit it, and a cache miss only costs one more encoder row."""
CAPTION_CACHE_BYTES = 2 << 30
"""Bytes of embeddings an actor keeps at most, whatever the encoder: 8,192 Wan captions (umT5, 512 x 4096 fp32,
8 MiB each) would be 64 GiB per actor, and a GPU node runs one actor per GPU beside the decoders. 2 GiB holds 256
Wan captions (enough for the multi-caption clips and repeated prompts near each other in the stream) and all
8,192 MiniLM ones."""
CAPTION_ROWS = 64
"""Clip plans per actor call: a full encoder batch (TEXT_BATCH_SIZE) for single-caption clips, and small
enough that decoding downstream starts early (the batch is also the unit the next stage receives)."""
TEXT_COLUMNS = ("caption", "text_tokens", "text_mask", "text_pooled")
TOKEN_COLUMNS = ("text_tokens", "extra_text_tokens")
"""Stored at each caption's true length (format 2), padded at load."""
EXTRA_COLUMNS = ("extra_captions", "extra_text_tokens", "extra_text_mask", "extra_text_pooled")


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode()).hexdigest()


class EmbedCaptions:
    """Ray Data actor: plans with `captions` (list of strings) -> plus the text columns (see the module)."""

    def __init__(self, config: TextEncoderConfig):
        import torch

        from sora_model.text import build_text_encoder

        gpu = torch.cuda.is_available()
        if not gpu:
            torch.set_num_threads(1)  # on CPU it shares the cores with the decoders; one thread each
        config = dataclasses.replace(config, cache_size=CAPTION_CACHE_ENTRIES)
        # On a GPU the weights are read straight into bf16 (umT5-XXL: 11 GB, not 22 GB of fp32 on the host first).
        dtype = getattr(torch, GPU_DTYPE) if gpu else None
        self.encoder = build_text_encoder(config, device="cuda" if gpu else "cpu", dtype=dtype)
        self.encoder.cache.set_max_bytes(CAPTION_CACHE_BYTES)
        self.embedded = 0

    def embed(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Unique-by-hash captions -> {tokens (U, L, D) fp16, mask (U, L) bool, pooled (U, D) fp32}, in order."""
        parts = [
            self.encoder.encode(captions[i : i + TEXT_BATCH_SIZE]) for i in range(0, len(captions), TEXT_BATCH_SIZE)
        ]
        self.embedded += len(captions)
        return {
            "tokens": np.concatenate([_numpy(p.tokens).astype(np.float16) for p in parts]),  # (U, L, D)
            "mask": np.concatenate([_numpy(p.mask).astype(bool) for p in parts]),  # (U, L)
            "pooled": np.concatenate([_numpy(p.pooled).astype(np.float32) for p in parts]),  # (U, D)
        }

    def truncated(self, captions: list[str]) -> np.ndarray:
        """(U,) bool: which captions have more tokens than the encoder keeps (max_length), so their ends are cut."""
        from sora_model.text import clean_prompt

        if self.encoder.clean_prompts:
            captions = [clean_prompt(c) for c in captions]
        ids = self.encoder.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        return np.asarray([len(i) > self.encoder.max_length for i in ids], dtype=bool)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        from pipelines.data.prepare.encode import _fixed_list

        per_clip = table.column("captions").to_pylist()
        unique = {caption_key(c): c for caps in per_clip for c in caps}
        row_of = {k: i for i, k in enumerate(unique)}
        emb = self.embed(list(unique.values()))
        cut = self.truncated(list(unique.values()))
        first = np.asarray([row_of[caption_key(caps[0])] for caps in per_clip], dtype=np.int64)
        extra = np.asarray([row_of[caption_key(c)] for caps in per_clip for c in caps[1:]], dtype=np.int64)
        offsets = pa.array(np.cumsum([0] + [len(caps) - 1 for caps in per_clip]), pa.int32())

        def listed(values: Any) -> Any:
            return pa.ListArray.from_arrays(offsets, values)

        lengths = true_lengths(emb["mask"])
        columns = {
            "caption": pa.array([caps[0] for caps in per_clip], pa.string()),
            "text_tokens": ragged_tokens(emb["tokens"], lengths, first),
            "text_mask": _fixed_list(emb["mask"][first], pa.bool_()),
            "text_pooled": _fixed_list(emb["pooled"][first], pa.float32()),
            "extra_captions": listed(pa.array([c for caps in per_clip for c in caps[1:]], pa.string())),
            "extra_text_tokens": listed(ragged_tokens(emb["tokens"], lengths, extra)),
            "extra_text_mask": listed(_fixed_list(emb["mask"][extra], pa.bool_())),
            "extra_text_pooled": listed(_fixed_list(emb["pooled"][extra], pa.float32())),
            "text_truncated": pa.array(
                [sum(bool(cut[row_of[caption_key(c)]]) for c in caps) for caps in per_clip], pa.int32()
            ),
        }
        table = table.drop_columns(["captions"])
        pad = {TOKENS_PAD_KEY: str(emb["mask"].shape[1])}  # the length tokens are padded to at load
        for name, col in columns.items():
            table = table.append_column(pa.field(name, col.type, metadata=pad if name in TOKEN_COLUMNS else None), col)
        return table


def true_lengths(mask: np.ndarray) -> np.ndarray:
    """(U, L) bool -> (U,) tokens up to and including each caption's last real one (the rest are zeros)."""
    return (mask * np.arange(1, mask.shape[1] + 1)).max(axis=1, initial=0).astype(np.int64)


def ragged_tokens(tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> Any:
    """Rows `rows` of (U, L, D) fp16 tokens, each cut to its true length: an Arrow list of (D,) fixed lists.

    The text encoder zeroes padding (sora_model.text), so cutting it off and padding with zeros at load
    (`pipelines.data.load`) gives back the same (L, D) array: a 20-token caption of umT5 (L 512, D 4096) is
    160 KiB on disk and in the object store instead of 4 MiB."""
    import pyarrow as pa

    from pipelines.data.prepare.encode import _fixed_list

    n = lengths[rows]
    flat = np.concatenate([tokens[r, :k] for r, k in zip(rows, n)]) if len(rows) else tokens[:0, 0]  # (sum n, D)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, _fixed_list(flat.reshape(-1, tokens.shape[2]), pa.float16()))


_ENCODERS: dict[str, EmbedCaptions] = {}
"""Per worker process: the encoder of the caption stage when it runs as tasks (see `embed_task`)."""


def embed_task(table: Any, config: TextEncoderConfig) -> Any:
    """The caption stage as plain tasks: EmbedCaptions kept loaded per worker process, across tasks and runs.

    For CPU-only clusters (`caption_actors=0`, their default): a Ray Data actor is a fresh process per
    run that imports torch and loads the encoder before the first caption (measured below), on the path of
    every clip; a warm task worker has both already."""
    key = repr(config)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = EmbedCaptions(config)
    return _ENCODERS[key](table)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x)
