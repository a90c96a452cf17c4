"""A batch's caption tokens between the text encoder and the DiT's cross-attention: which columns a batch needs
(`trim_text_padding`, masked captions; `collapse_zero_padding`, Wan's zero-padded captions attended whole, exactly)
and which captions training drops to the null condition (`null_text_drop`, classifier-free guidance's dropout).
"""

from __future__ import annotations

import torch


def trim_text_padding(text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop caption columns no caption of the batch uses: (B, L, Dt), (B, L) -> (B, L', Dt), (B, L').

    Captions are padded to the encoder's max_length; the unused columns only cost cross-attention time.
    One host sync, so call it once per batch (per generation, per data batch), never inside the model.
    """
    used = text_mask.bool().any(0)
    keep = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return text_tokens[:, :keep], text_mask[:, :keep]


def collapse_zero_padding(text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero-padded captions attended whole (Wan) -> the same attention over fewer columns, exactly.

    (B, L, Dt) -> (B, L', Dt) and (B, L') float log-weights for cross-attention's logits (None when nothing is cut),
    L' = the longest caption's real length + 1. A caption's zero rows after its last nonzero one are identical, so
    they embed to identical keys and values: attending to m equal keys is attending to one of them with its logit
    raised by log m (softmax weights m e^s / Z). Each caption keeps its L' - real zero columns, each weighted
    log((L - real) / (L' - real)). The context embedder and every cross-attention then see L' columns, not L
    (512 for Wan). One host sync (the length), so eager inference only; training and compiled graphs keep L.
    """
    b, length, _ = text_tokens.shape
    index = torch.arange(1, length + 1, device=text_tokens.device)  # (L,)
    real = (text_tokens.ne(0).any(-1) * index).amax(-1)  # (B,) rows up to the last nonzero one
    keep = int(real.max()) + 1
    if keep >= length:
        return text_tokens, None
    copies = ((length - real) / (keep - real)).log()[:, None]  # (B, 1): rows each kept zero row stands for, as a log
    weights = torch.where(index[None, :keep] > real[:, None], copies, torch.zeros((), device=index.device))  # (B, L')
    return text_tokens[:, :keep], weights


def null_text_drop(batch_size: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) bool: which captions to replace by the null condition in training (CFG's condition dropout)."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return (torch.rand(batch_size, generator=generator) < p).to(device)
