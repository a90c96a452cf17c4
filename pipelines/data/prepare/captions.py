"""Caption embeddings, inside the stream: an actor stage between planning and decoding.

Each actor loads the text encoder once (on a GPU when the cluster has them), takes batches of clip plans,
embeds their captions deduplicated by caption hash (within the batch, and across batches through the
encoder's LRU cache, bounded by CAPTION_CACHE_BYTES and CAPTION_CACHE_ENTRIES), and attaches the embeddings to the rows in half
precision. No process ever holds a table of every caption: memory is one batch plus the cache.

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

from pipelines.data.prepare.options import GPU_DTYPE, TEXT_BATCH_SIZE
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
        self.encoder = build_text_encoder(config, device="cuda" if gpu else "cpu")
        self.encoder.cache.set_max_bytes(CAPTION_CACHE_BYTES)
        if gpu:
            self.encoder.model.to(getattr(torch, GPU_DTYPE))
        self.embedded = 0

    def embed(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Unique-by-hash captions -> {tokens (U, L, D) fp16, mask (U, L) bool, pooled (U, D) fp32}, in order."""
        parts = [self.encoder.encode(captions[i : i + TEXT_BATCH_SIZE]) for i in range(0, len(captions), TEXT_BATCH_SIZE)]
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

        columns = {
            "caption": pa.array([caps[0] for caps in per_clip], pa.string()),
            "text_tokens": _fixed_list(emb["tokens"][first], pa.float16()),
            "text_mask": _fixed_list(emb["mask"][first], pa.bool_()),
            "text_pooled": _fixed_list(emb["pooled"][first], pa.float32()),
            "extra_captions": listed(pa.array([c for caps in per_clip for c in caps[1:]], pa.string())),
            "extra_text_tokens": listed(_fixed_list(emb["tokens"][extra], pa.float16())),
            "extra_text_mask": listed(_fixed_list(emb["mask"][extra], pa.bool_())),
            "extra_text_pooled": listed(_fixed_list(emb["pooled"][extra], pa.float32())),
            "text_truncated": pa.array([sum(bool(cut[row_of[caption_key(c)]]) for c in caps) for caps in per_clip], pa.int32()),
        }
        table = table.drop_columns(["captions"])
        for name, col in columns.items():
            table = table.append_column(name, col)
        return table


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
