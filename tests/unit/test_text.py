"""Text encoders: packaged MiniLM offline, tiny random T5 / BERT / CLIP from folders, the embedding cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a download attempt must fail loudly

import pytest
import torch

from sora_model.config import TextEncoderConfig
from sora_model.text import EmbeddingCache, TextEmbedding, TextEncoder, build_text_encoder, minilm_path

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red circle moving left", "a blue square moving up", "a red circle moving left"]
VOCAB = 30522  # the MiniLM (BERT WordPiece) tokenizer that the tiny models reuse


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(TextEncoderConfig(name_or_path="minilm", max_length=32, cache_size=16))


def _check_embedding(emb: TextEmbedding, batch: int, length: int, dim: int) -> None:
    """Shared shape/dtype checks for every encoder."""
    assert emb.tokens.shape == (batch, length, dim) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (batch, length) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (batch, dim) and emb.pooled.dtype == torch.float32
    assert emb.mask[:, 0].all() and not emb.mask.all()  # short captions: real tokens, then padding
    assert (emb.tokens[~emb.mask] == 0).all()  # padding rows are zero


# --- MiniLM ----------------------------------------------------------------------------------


def test_minilm_path_is_the_packaged_folder() -> None:
    folder = Path(minilm_path())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_minilm_offline_shapes(minilm: TextEncoder) -> None:
    assert (minilm.dim, minilm.max_length, minilm.name_or_path) == (384, 32, "minilm")
    assert not minilm.model.training
    emb = minilm.encode(CAPTIONS)
    _check_embedding(emb, 3, 32, 384)
    assert int(emb.mask[0].sum()) == 7  # [CLS] a red circle moving left [SEP]
    long = minilm.encode(["word " * 100])
    assert long.tokens.shape == (1, 32, 384) and long.mask.all()  # truncated to max_length


def test_minilm_similar_captions_are_closer(minilm: TextEncoder) -> None:
    pooled = torch.nn.functional.normalize(
        minilm.encode(
            ["a red circle moving left", "a red circle moving right", "the quarterly tax report is due"]
        ).pooled,
        dim=-1,
    )
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_hidden_layer_picks_the_hidden_state(minilm: TextEncoder) -> None:
    captions = ["a red circle moving left", "a red circle moving right"]
    batch = minilm.tokenizer(captions, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        states = minilm.model(**batch, output_hidden_states=True).hidden_states  # embeddings + 6 layers
    mask = batch["attention_mask"].bool()[..., None]
    for layer, index in ((0, 0), (2, 2), (-1, 6), (6, 6), (-7, 0)):
        enc = build_text_encoder(TextEncoderConfig(hidden_layer=layer))
        emb = enc.encode(captions)
        torch.testing.assert_close(emb.tokens, states[index] * mask)
        torch.testing.assert_close(emb.pooled, (states[index] * mask).sum(1) / mask.sum(1))
    # Why the option exists: the embeddings keep "left" and "right" further apart than the last layer.
    word = int(batch["attention_mask"][0].sum()) - 2  # the direction, before [SEP]
    cos = lambda t: torch.nn.functional.cosine_similarity(t[0, word], t[1, word], dim=0)  # noqa: E731
    assert cos(states[0]) < cos(states[6]) - 0.2
    for bad in (7, -8):
        with pytest.raises(ValueError, match=rf"hidden_layer {bad} is out of range for 'minilm' \(6 layers: use -7..6"):
            build_text_encoder(TextEncoderConfig(hidden_layer=bad))


def test_cache_counts_hits_and_returns_identical_tensors() -> None:
    enc = build_text_encoder(TextEncoderConfig(cache_size=2))
    first = enc.encode(CAPTIONS)  # the repeated caption is encoded once
    assert (enc.cache.hits, enc.cache.misses, len(enc.cache)) == (0, 3, 2)
    again = enc.encode(CAPTIONS[:2])
    assert (enc.cache.hits, enc.cache.misses) == (2, 3)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[:2], b)
    assert torch.equal(first.tokens[0], first.tokens[2])
    enc.encode(["a green triangle moving down"])  # evicts the least recently used entry
    assert len(enc.cache) == 2
    uncached = build_text_encoder(TextEncoderConfig(cache_size=0))
    uncached.encode(CAPTIONS)
    assert len(uncached.cache) == 0
    torch.testing.assert_close(uncached.encode(CAPTIONS[:2]).tokens, again.tokens)


def test_embedding_cache_lru() -> None:
    cache = EmbeddingCache(2)
    item = TextEmbedding(torch.zeros(1, 1), torch.ones(1, dtype=torch.bool), torch.zeros(1))
    for text in "abc":
        cache.put(("e", 1, text), item)
    assert cache.get(("e", 1, "a")) is None and cache.get(("e", 1, "c")) is item
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(ValueError, match="cache_size"):
        EmbeddingCache(-1)


def test_empty_batch(minilm: TextEncoder) -> None:
    assert minilm.encode([]).tokens.shape == (0, 32, 384)


# --- tiny random models from folders ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def _t5() -> torch.nn.Module:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return transformers.T5EncoderModel(cfg)


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return transformers.BertModel(cfg)


def _clip_text() -> torch.nn.Module:
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
        eos_token_id=102,  # [SEP] ends a WordPiece caption
    )
    return transformers.CLIPTextModel(cfg)


def _clip_full() -> torch.nn.Module:
    """A whole CLIPModel folder, as real CLIP checkpoints are saved: only its text tower is loaded."""
    text = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
        eos_token_id=102,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    return transformers.CLIPModel(cfg)


@pytest.mark.parametrize(
    "make,model_type,pooling",
    [
        (_t5, "t5", "mean"),
        (_bert, "bert", "mean"),
        (_clip_text, "clip_text_model", "pooler"),
        (_clip_full, "clip", "pooler"),
    ],
    ids=["t5", "bert", "clip_text", "clip"],
)
def test_tiny_models_from_folders(tmp_path: Path, tokenizer, make, model_type: str, pooling: str) -> None:
    torch.manual_seed(0)
    folder = tmp_path / model_type
    model = make()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert model.config.model_type == model_type
    enc = build_text_encoder(TextEncoderConfig(name_or_path=str(folder), max_length=12, cache_size=8))
    assert (enc.dim, enc.pooling, enc.name_or_path) == (16, pooling, str(folder))
    emb = enc.encode(CAPTIONS)
    _check_embedding(emb, 3, 12, 16)
    if pooling == "mean":
        torch.testing.assert_close(emb.pooled[0], emb.tokens[0][emb.mask[0]].mean(0))
    assert enc.cache.hits == 0 and enc.cache.misses == 3
    first = build_text_encoder(TextEncoderConfig(name_or_path=str(folder), max_length=12, hidden_layer=0)).encode(
        CAPTIONS
    )
    _check_embedding(first, 3, 12, 16)
    assert not torch.allclose(first.tokens, emb.tokens)  # the token embeddings, not the last layer


def test_max_length_beyond_positions(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    _clip_text().save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="max_length 77 exceeds the 40 positions"):
        build_text_encoder(TextEncoderConfig(name_or_path=str(tmp_path), max_length=77))


def test_missing_path_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        build_text_encoder(TextEncoderConfig(name_or_path=missing))
    assert str(err.value) == (
        f"text encoder '{missing}' not found: give 'minilm' or a local folder saved with save_pretrained"
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        build_text_encoder(TextEncoderConfig(name_or_path="t5-small"))  # a hub name is never downloaded
