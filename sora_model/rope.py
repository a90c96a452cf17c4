"""3D rotary position embeddings.

Each head's dimensions are split into three groups that rotate with the token's t, h and w
coordinate. Attention logits then depend only on relative offsets, so there is no learned or fixed
position table: one model runs at resolutions and lengths it never saw in training (the article's
1000-position table cannot).
"""

from __future__ import annotations

import torch


def rope_split(head_dim: int, split: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Dims per axis (t, h, w); each even because RoPE rotates pairs."""
    if split is None:
        hw = (head_dim // 3) // 2 * 2
        split = (head_dim - 2 * hw, hw, hw)
    if sum(split) != head_dim or any(s % 2 or s < 0 for s in split):
        raise ValueError(f"rope split {split} must be three even numbers summing to the head dim {head_dim}")
    return split


def rope_frequencies(head_dim: int, split: tuple[int, int, int] | None = None, theta: float = 10000.0) -> list[torch.Tensor]:
    """Inverse frequencies per axis: [(d_t/2,), (d_h/2,), (d_w/2,)]."""
    return [theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) if d else torch.zeros(0, dtype=torch.float64) for d in rope_split(head_dim, split)]


def rope_angles(positions: torch.Tensor, freqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3) or (N, 3) integer positions -> cos, sin of shape (B, 1, N, head_dim/2), broadcast over heads."""
    if positions.ndim == 2:
        positions = positions.unsqueeze(0)  # (1, N, 3)
    pos = positions.to(torch.float64)
    angles = torch.cat(
        [pos[..., axis, None] * f.to(pos.device) for axis, f in enumerate(freqs)], dim=-1
    )  # (B, N, head_dim/2); float64 so large positions keep their precision
    angles = angles.unsqueeze(1)  # (B, 1, N, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, d) by the angles; returns x's dtype (bf16 stays bf16).

    Each pair is a complex number and the rotation one complex multiply: a single fused kernel where
    the real-arithmetic form (two products, a difference, a sum and a stack) took ~10x longer on CPU.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, H, N, d/2) complex
    rotated = pairs * torch.complex(cos, sin)  # (B, H, N, d/2)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (B, H, N, d)


def sincos_position_embedding(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(..., 3) integer (t, h, w) positions -> (..., dim) fixed sin-cos features, dims split like `rope_split`.

    Each axis gets sin and cos of its coordinate at geometric frequencies (Transformer / DiT style).
    """
    if dim % 2:
        raise ValueError(f"absolute position embeddings need an even width, got {dim}")
    pos = positions.to(torch.float64)
    parts = []
    for axis, d in enumerate(rope_split(dim)):
        if d == 0:
            continue
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)  # (d/2,)
        angles = pos[..., axis, None] * freqs  # (..., d/2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1).float()  # (..., dim)
