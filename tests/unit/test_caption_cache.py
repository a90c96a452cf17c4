"""The caption stage's embedding cache is bounded by bytes, not only by entries (no Ray)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.data.prepare import captions


def test_caption_actor_cache_stays_within_its_byte_budget(monkeypatch):
    from sora_model.config import TextEncoderConfig
    from sora_model.text import embedding_bytes

    embed = captions.EmbedCaptions(TextEncoderConfig())
    assert embed.encoder.cache.max_bytes == captions.CAPTION_CACHE_BYTES  # not the machine-memory share
    one = embedding_bytes(embed.encoder.encode(["a red circle"]))  # (L, D) tokens + mask + pooled: one entry
    embed.encoder.cache.clear()
    monkeypatch.setattr(captions, "CAPTION_CACHE_BYTES", 3 * one)
    embed = captions.EmbedCaptions(TextEncoderConfig())
    texts = [f"a {c} square moving {d}" for c in ("red", "green", "blue") for d in ("left", "right", "up")]
    embed(pa.table({"clip_id": [str(i) for i in range(len(texts))], "captions": [[t] for t in texts]}))
    cache = embed.encoder.cache
    assert len(cache) == 3 and cache.bytes <= 3 * one < len(texts) * one and cache.evictions == len(texts) - 3
