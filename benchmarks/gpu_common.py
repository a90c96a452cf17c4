"""Pieces the GPU benchmark scripts share; importable where only torch and transformers are installed.

The GPU machines these scripts run on have no Ray, DeepSpeed or diffusers and cannot download anything,
and the MiniLM package (88 MB of weights) is larger than what a call carries there. Generation cost does
not depend on weight values, so the text encoder here is a MiniLM-shaped BERT with random weights and a
small generated vocabulary: the same shapes and the same code path as the real encoder.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable


def cuda_timed(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall seconds of `reps` calls, each between device synchronisations."""
    import torch

    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def peak_gib(reset: bool = False) -> float:
    """Peak allocated CUDA memory since the last reset, GiB."""
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def random_text_encoder(dim: int = 384, layers: int = 6, max_length: int = 32, device: str = "cuda"):
    """A `TextEncoder` around a BERT of MiniLM-L6's shape with random weights (no download, no package)."""
    import transformers

    from sora_model.text import TextEncoder

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]
    words += "a the red blue green circle square moving left right up down small large".split()
    folder = tempfile.mkdtemp(prefix="gpu-text-")
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(os.path.join(folder, "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=4 * dim,
        max_position_embeddings=512,
    )
    model = transformers.BertModel(config)
    return TextEncoder(model, tokenizer, "random-minilm-shape", max_length, "mean").to(device)
