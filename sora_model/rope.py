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


def rope_frequencies(
    head_dim: int, split: tuple[int, int, int] | None = None, theta: float = 10000.0, device: torch.device | None = None
) -> list[torch.Tensor]:
    """Inverse frequencies per axis: [(d_t/2,), (d_h/2,), (d_w/2,)], made on `device` (no host-to-device copy)."""
    return [
        theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        if d
        else torch.zeros(0, dtype=torch.float64, device=device)
        for d in rope_split(head_dim, split)
    ]


def rope_rotation(positions: torch.Tensor, freqs: list[torch.Tensor], real: bool | None = None) -> torch.Tensor:
    """(B, N, 3) or (N, 3) integer positions -> per (token, dimension pair) unit rotations, shared by heads.

    Eager: (B, N, 1, head_dim/2) complex64, so `apply_rope` is one fused complex multiply. Under
    `torch.compile` (or `real=True`): (B, N, 1, head_dim/2, 2) float32 (cos, sin), because Inductor generates
    no code for complex operators and would fall back to eager kernels; its fused real arithmetic is fast.
    Built once per forward pass and shared by every block's queries and keys.
    """
    if real is None:
        real = torch.compiler.is_compiling()
    if positions.ndim == 2:
        positions = positions.unsqueeze(0)  # (1, N, 3)
    pos = positions.to(torch.float64)
    angles = torch.cat(
        [pos[..., axis, None] * f.to(pos.device) for axis, f in enumerate(freqs)], dim=-1
    )  # (B, N, head_dim/2); float64 so large positions keep their precision
    if real:
        return torch.stack([angles.cos(), angles.sin()], dim=-1).float().unsqueeze(2)  # (B, N, 1, head_dim/2, 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(2)  # (B, N, 1, head_dim/2)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, N, ..., H, d) by `rope_rotation`'s output; keeps x's dtype.

    Each pair is a complex number and the rotation one complex multiply: a single fused kernel where
    the real-arithmetic form (two products, a difference, a sum and a stack) took ~10x longer on CPU
    in eager mode. Compiled, the real form fuses into one kernel too. Axes between N and H (queries and
    keys stacked, say) share the rotation.
    """
    lead = (*rotation.shape[:2], *([1] * (x.ndim - 3)))
    if not rotation.is_complex():
        cos, sin = rotation.reshape(*lead, *rotation.shape[-2:]).unbind(-1)  # (B, N, ..., 1, d/2) each
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, ..., H, d/2) each
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)  # (B, N, ..., H, d)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, N, ..., H, d/2)
    rotation = rotation.reshape(*lead, rotation.shape[-1])
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)  # (B, N, ..., H, d)


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
