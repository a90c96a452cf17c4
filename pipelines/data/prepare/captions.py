"""Caption embeddings: the text encoder over unique captions, tokens in half precision."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.data.prepare.options import TEXT_BATCH_SIZE
from sora_model.config import TextEncoderConfig


def embed_captions(captions: list[str], config: TextEncoderConfig) -> dict[str, Any]:
    """The text table of `captions`, in one process (one encoder load): {captions, tokens, mask, pooled}."""
    embed = EmbedCaptions(config)
    parts = [embed({"caption": np.asarray(captions[i : i + TEXT_BATCH_SIZE], dtype=object)}) for i in range(0, len(captions), TEXT_BATCH_SIZE)]
    return {
        "captions": [str(c) for p in parts for c in p["caption"]],
        "tokens": np.concatenate([p["tokens"] for p in parts]),  # (U, L, D) float16
        "mask": np.concatenate([p["mask"] for p in parts]),  # (U, L) bool
        "pooled": np.concatenate([p["pooled"] for p in parts]),  # (U, D) float32
    }


class EmbedCaptions:
    """Ray Data actor: unique captions -> text tokens (fp16), mask and pooled embedding."""

    def __init__(self, config: TextEncoderConfig):
        from sora_model.text import build_text_encoder

        self.encoder = build_text_encoder(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        emb = self.encoder.encode(captions)
        return {
            "caption": np.asarray(captions, dtype=object),
            "tokens": _numpy(emb.tokens).astype(np.float16),  # (B, L, D)
            "mask": _numpy(emb.mask).astype(bool),  # (B, L)
            "pooled": _numpy(emb.pooled).astype(np.float32),  # (B, D)
        }


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x)



def _collect_text_table(ds: Any) -> dict[str, Any]:
    captions, tokens, mask, pooled = [], [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        captions.extend(str(c) for c in batch["caption"])
        tokens.append(batch["tokens"])
        mask.append(batch["mask"])
        pooled.append(batch["pooled"])
    return {
        "captions": captions,
        "tokens": np.concatenate(tokens),  # (U, L, D) float16
        "mask": np.concatenate(mask),  # (U, L) bool
        "pooled": np.concatenate(pooled),  # (U, D) float32
    }
