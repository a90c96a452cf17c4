"""Caches bounded by bytes, and a result-cache key that changes with everything that changes the clip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sora_model.config import TextEncoderConfig
from sora_model.text import EmbeddingCache, TextEmbedding, build_text_encoder, embedding_bytes


def entry(length: int, dim: int) -> TextEmbedding:
    return TextEmbedding(torch.zeros(length, dim), torch.ones(length, dtype=torch.bool), torch.zeros(dim))


def test_embedding_cache_is_bounded_by_bytes_not_only_entries() -> None:
    """A Wan-sized caption (512 x 4096 fp32, 8 MiB) against a 20 MiB budget: the cache holds two, whatever
    its entry capacity (4,096, the default) allows; the bytes it reports are the bytes it holds."""
    wan = entry(512, 4096)
    size = embedding_bytes(wan)
    assert size >= 8 * 2**20
    cache = EmbeddingCache(4096, max_bytes=20 * 2**20)
    for i in range(10):
        cache.put(("umt5", 512, -1, f"caption {i}"), entry(512, 4096))
    assert len(cache) == 2 and cache.bytes == 2 * size <= cache.max_bytes
    assert cache.evictions == 8
    assert cache.get(("umt5", 512, -1, "caption 9")) is not None and cache.get(("umt5", 512, -1, "caption 0")) is None
    cache.set_max_bytes(size)  # a smaller budget applies at once
    assert len(cache) == 1 and cache.bytes == size
    cache.put(("umt5", 1024, -1, "too big"), entry(1024, 4096))  # bigger than the whole budget: not kept
    assert len(cache) == 1 and cache.bytes == size
    with pytest.raises(ValueError, match="budget"):
        EmbeddingCache(4, max_bytes=-1)


def test_default_budget_is_a_share_of_the_machines_memory() -> None:
    from sora_model.text import DEFAULT_CACHE_MEMORY_FRACTION, machine_memory_bytes

    cache = EmbeddingCache(4096)
    assert 0 < cache.max_bytes == int(machine_memory_bytes() * DEFAULT_CACHE_MEMORY_FRACTION)
    assert cache.max_bytes < 4096 * 8 * 2**20  # the entry bound alone would have allowed 32 GiB


def test_cached_entries_do_not_pin_the_batch_they_were_encoded_in() -> None:
    """Each entry owns its storage: a view into the (B, L, D) batch would hold B times what the budget counts."""
    enc = build_text_encoder(TextEncoderConfig(cache_size=8))
    enc.encode(["a red circle moving left", "a blue square moving up", "a cyan triangle moving down"])
    held = sum(t.untyped_storage().nbytes() for v, _ in enc.cache._items.values() for t in v)
    assert held == enc.cache.bytes


def test_result_cache_key_changes_with_weights_lora_precision_sampler_parameters_and_owner() -> None:
    from pipelines.serve.api import GenerationParams
    from pipelines.serve.app import result_cache_key

    params = GenerationParams(
        prompt="a red circle moving left",
        num_frames=8,
        height=32,
        width=32,
        steps=4,
        guidance_scale=2.0,
        seed=3,
        sampler="euler",
        negative_prompt=None,
        fps=8,
        model="sora-ray",
    )
    ident = {"weights": "a" * 64, "lora": None, "precision": "fp32"}
    base = result_cache_key(params, "alice", ident)
    assert base == result_cache_key(params, "alice", dict(ident))  # deterministic
    variants = [
        result_cache_key(params, "bob", ident),  # another tenant
        result_cache_key(params, "alice", {**ident, "weights": "b" * 64}),  # another export
        result_cache_key(params, "alice", {**ident, "lora": "style:" + "c" * 64}),  # a LoRA merged in
        result_cache_key(params, "alice", {**ident, "precision": "int8"}),  # another precision
    ]
    for field, value in (
        ("sampler", "heun"),
        ("steps", 5),
        ("guidance_scale", 3.0),
        ("seed", 4),
        ("negative_prompt", "blur"),
        ("num_frames", 16),
        ("width", 64),
        ("fps", 4),
        ("prompt", "a red circle moving right"),
    ):
        variants.append(result_cache_key(dataclasses.replace(params, **{field: value}), "alice", ident))
    assert len({base, *variants}) == len(variants) + 1
    assert len(base) == 64
