"""Attention on `scaled_dot_product_attention`: full 3D, factorised, temporally windowed, with masks.

A block attends within a *scope* (article 2.1 and 2.2):
- `full` with window 0: every token sees every token of its clip (3D attention);
- `full` with window w: tokens see the tokens of their own block of w latent frames (all positions),
  so cost grows linearly with clip length; blocks with windows 4, 16 and global give the article's
  multi-scale temporal modelling;
- `spatial`: tokens of the same frame; `temporal` (optionally windowed): tokens at the same (h, w).

Two ways to compute the same thing. When every clip in the batch has the same grid and no padding
(the training case: batches come from one bucket), tokens are reshaped into windows and SDPA runs
on dense, smaller sequences: real savings. When clips differ in size (padded, with a token mask),
the scope becomes a boolean mask over all N tokens; slower, but exact, and a test checks that both
paths agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

ScopeKind = Literal["full", "spatial", "temporal"]


@dataclass(frozen=True)
class AttentionScope:
    kind: ScopeKind = "full"
    window: int = 0
    """Temporal window in latent frames; 0 = global."""


@dataclass
class TokenLayout:
    """Where each token of a batch sits, shared by every block of one forward pass."""

    positions: torch.Tensor
    """(B, N, 3) integer (t, h, w) coordinates."""
    token_mask: torch.Tensor | None = None
    """(B, N) bool, True for real tokens; None when nothing is padded."""
    grid: tuple[int, int, int] | None = None
    """(T', H', W') when all clips share it and nothing is padded: enables the reshape fast path."""
    _masks: dict[AttentionScope, torch.Tensor] = field(default_factory=dict, repr=False)

    def attention_mask(self, scope: AttentionScope) -> torch.Tensor | None:
        """(B, 1, N, N) bool: may query i attend to key j. Built once per scope and reused by every block."""
        if scope.kind == "full" and scope.window == 0:
            if self.token_mask is None:
                return None
            return self.token_mask[:, None, None, :]  # (B, 1, 1, N)
        if scope not in self._masks:
            pos = self.positions
            t = pos[..., 0]
            same = torch.ones(pos.shape[0], pos.shape[1], pos.shape[1], dtype=torch.bool, device=pos.device)
            if scope.kind == "spatial":
                same &= t[:, :, None] == t[:, None, :]
            if scope.kind == "temporal":
                same &= (pos[:, :, None, 1:] == pos[:, None, :, 1:]).all(-1)
            if scope.window:
                tw = torch.div(t, scope.window, rounding_mode="floor")
                same &= tw[:, :, None] == tw[:, None, :]
            if self.token_mask is not None:
                same &= self.token_mask[:, None, :]
                # Padded queries would otherwise see no key at all (NaN rows); let them see themselves.
                same |= torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
            self._masks[scope] = same[:, None]  # (B, 1, N, N)
        return self._masks[scope]


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], scope: AttentionScope) -> torch.Tensor | None:
    """Dense attention inside the scope's groups by reshaping; None when the grid does not allow it."""
    b, h, n, d = q.shape
    gt, gh, gw = grid
    s = gh * gw
    window = scope.window if 0 < scope.window < gt else 0
    if window and gt % window:
        return None  # ragged last window: use the mask path
    if scope.kind == "full" and not window:
        return F.scaled_dot_product_attention(q, k, v)

    def group(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(b, h, gt, s, d)  # (B, H, T', S, D)
        if scope.kind == "spatial":
            return x.transpose(1, 2).reshape(b * gt, h, s, d)  # (B*T', H, S, D)
        if scope.kind == "temporal":
            x = x.permute(0, 3, 1, 2, 4)  # (B, S, H, T', D)
            w = window or gt
            x = x.reshape(b, s, h, gt // w, w, d).permute(0, 1, 3, 2, 4, 5)  # (B, S, T'/w, H, w, D)
            return x.reshape(b * s * (gt // w), h, w, d)  # (B*S*T'/w, H, w, D)
        # full attention inside blocks of `window` frames
        x = x.reshape(b, h, gt // window, window * s, d).transpose(1, 2)  # (B, T'/w, H, w*S, D)
        return x.reshape(b * (gt // window), h, window * s, d)  # (B*T'/w, H, w*S, D)

    out = F.scaled_dot_product_attention(group(q), group(k), group(v))
    # undo the grouping
    if scope.kind == "spatial":
        out = out.reshape(b, gt, h, s, d).transpose(1, 2)  # (B, H, T', S, D)
    elif scope.kind == "temporal":
        w = window or gt
        out = out.reshape(b, s, gt // w, h, w, d).permute(0, 1, 3, 2, 4, 5)  # (B, S, H, T'/w, w, D)
        out = out.reshape(b, s, h, gt, d).permute(0, 2, 3, 1, 4)  # (B, H, T', S, D)
    else:
        out = out.reshape(b, gt // window, h, window * s, d).transpose(1, 2)  # (B, H, T'/w, w*S, D)
    return out.reshape(b, h, n, d)  # (B, H, N, D)


def _qk_norm(qk: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module) -> torch.Tensor:
    """RMS-normalise stacked queries and keys (B, N, 2, H, Dh), each through its own module.

    Calling the modules (rather than reading their weights into one fused op) is what lets DeepSpeed
    ZeRO-3 gather a partitioned weight: it does so in the module's forward hook.
    """
    if isinstance(q_norm, nn.Identity):
        return qk
    return torch.stack([q_norm(qk[:, :, 0]), k_norm(qk[:, :, 1])], dim=2)  # (B, N, 2, H, Dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE, restricted to a scope.

    Queries and keys are normalised and rotated together, in the (B, N, H, Dh) layout the QKV
    projection produces; SDPA reads them through transposed views, so the spatial and full scopes
    copy nothing between the projection and the output (only temporal grouping must gather).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, layout: TokenLayout, scope: AttentionScope) -> torch.Tensor:
        b, n, dim = x.shape
        qk, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).split((2, 1), dim=2)  # (B, N, 2|1, H, Dh)
        qk = apply_rope(_qk_norm(qk, self.q_norm, self.k_norm), rope)  # (B, N, 2, H, Dh)
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # (B, H, N, Dh) views
        v = v.squeeze(2).transpose(1, 2)  # (B, H, N, Dh) view
        out = _windowed(q, k, v, layout.grid, scope) if layout.grid is not None else None
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.attention_mask(scope))  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))  # (B, N, D)


class CrossAttention(nn.Module):
    """Queries from video tokens, keys and values from text tokens (article 3.2), text-masked."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q = self.q_norm(self.q(x).unflatten(-1, (self.num_heads, self.head_dim))).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).unflatten(-1, (2, self.num_heads, self.head_dim))  # (B, L, 2, H, Dh)
        k, v = self.k_norm(kv[:, :, 0]).transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, L, Dh)
        mask = context_mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))  # (B, N, D)
