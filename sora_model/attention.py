"""Attention on `scaled_dot_product_attention`: full 3D, factorised, temporally windowed; never an N×N mask.

A block attends within a *scope* (article 2.1 and 2.2):
- `full` with window 0: every token sees every token of its clip (3D attention);
- `full` with window w: tokens see the tokens of their own block of w latent frames (all positions),
  so cost grows linearly with clip length; blocks with windows 4, 16 and global give the article's
  multi-scale temporal modelling;
- `spatial`: tokens of the same frame; `temporal` (optionally windowed): tokens at the same (h, w).

Every scope runs as dense SDPA over reshaped groups of tokens, never as a boolean mask over all N tokens
(a (B, N, N) mask is 8 GB at 90k tokens, and SDPA turns it into a bias that costs global attention in
every windowed block). A window that does not divide the clip's T' (T' = 21 with window 4: every causal-VAE
clip) is the full windows as one call plus the shorter last window as another.

A batch is a `TokenLayout`: a sequence of *segments*, each `count` clips of one grid, their tokens
concatenated clip after clip (t-major inside a clip, as `patch.py` lays them out). A batch of one bucket
is a single segment: (B, N, D) tokens, pure views. A packed batch (NaViT) mixes grids in one (1, ΣN, D)
sequence; each segment is attended as its own dense batch, so no clip ever sees another's tokens and no
token is padding. Everything a layout holds is Python ints: shapes never depend on tensor data, so
`torch.compile` traces one graph per layout (one per bucket) with no graph break.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

ScopeKind = Literal["full", "spatial", "temporal"]
Grid = tuple[int, int, int]

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Local attention: (q, k, v) each (B, H, N, Dh) in token order -> (B, H, N, Dh)."""
AttentionHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttendFn], torch.Tensor]
"""Wraps the local attention of every self-attention layer: hook(q, k, v, attend) -> out. Sequence
parallelism (`pipelines/train/sequence_parallel.py`) installs one that re-shards around `attend`."""


@dataclass(frozen=True)
class AttentionScope:
    kind: ScopeKind = "full"
    window: int = 0
    """Temporal window in latent frames; 0 = global."""


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of a batch sits: consecutive segments of same-grid clips (Python ints only)."""

    segments: tuple[tuple[Grid, int], ...]
    """((grid, count), ...): `count` clips of grid (T', H', W'), tokens clip after clip, t-major."""
    packed: bool = False
    """True: tokens are one (1, ΣN, D) sequence; False: a single segment held as (count, N, D)."""
    shard: tuple[int, int] = (0, 1)
    """(index, count): this call holds the index-th of `count` equal contiguous pieces of each clip's tokens
    (sequence parallelism, single segment only); attention's hook brings in the rest. (0, 1): all of them."""

    @staticmethod
    def dense(grid: Grid, batch: int) -> TokenLayout:
        """B clips of one grid, tokens (B, N, D)."""
        return TokenLayout(((tuple(grid), batch),))

    @staticmethod
    def from_grids(grids: tuple[Grid, ...] | list[Grid]) -> TokenLayout:
        """Packed clips in the given order; neighbours with equal grids share a segment (one SDPA call)."""
        if not grids:
            raise ValueError("a packed batch needs at least one clip grid")
        segments: list[tuple[Grid, int]] = []
        for g in grids:
            g = tuple(int(s) for s in g)
            if len(g) != 3 or min(g) < 1:
                raise ValueError(f"clip grids must be three positive ints (T', H', W'), got {g}")
            if segments and segments[-1][0] == g:
                segments[-1] = (g, segments[-1][1] + 1)
            else:
                segments.append((g, 1))
        return TokenLayout(tuple(segments), packed=True)

    @property
    def num_clips(self) -> int:
        return sum(count for _, count in self.segments)

    @property
    def num_tokens(self) -> int:
        return sum(math.prod(grid) * count for grid, count in self.segments)

    def grids(self) -> list[Grid]:
        """One grid per clip, in order."""
        return [grid for grid, count in self.segments for _ in range(count)]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, ...) tokens (one segment) or (1, ΣN, ...) (packed) -> per segment (count, N_seg, ...)."""
        if not self.packed:
            return [x]
        flat = x.reshape(-1, *x.shape[2:])  # (ΣN, ...)
        sizes = [math.prod(grid) * count for grid, count in self.segments]
        return [
            part.reshape(count, math.prod(grid), *x.shape[2:])
            for part, (grid, count) in zip(flat.split(sizes), self.segments)
        ]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`: per segment (count, N_seg, ...) -> the batch's token tensor."""
        if not self.packed:
            return parts[0]
        return torch.cat([p.reshape(-1, *p.shape[2:]) for p in parts]).unsqueeze(0)  # (1, ΣN, ...)

    def per_clip(self, c: torch.Tensor) -> list[torch.Tensor]:
        """(clips, ...) per-clip values (timestep features, captions) -> per segment (count, ...)."""
        return list(c.split([count for _, count in self.segments]))

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """adaLN: tokens times (1 + their clip's scale) plus its shift; shift, scale (clips, D)."""
        parts = zip(self.split(x), self.per_clip(shift), self.per_clip(scale))
        # one pass over the tokens
        return self.merge([torch.addcmul(sh[:, None], p, 1 + sc[:, None]) for p, sh, sc in parts])

    def gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Tokens times their clip's (clips, D) gate."""
        return self.merge([p * g[:, None] for p, g in zip(self.split(x), self.per_clip(gate))])

    def add_gated(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + `gate(y, gate)` in one pass over the tokens (the residual update of a gated sublayer)."""
        parts = zip(self.split(x), self.split(y), self.per_clip(gate))
        return self.merge([torch.addcmul(xs, ys, g[:, None]) for xs, ys, g in parts])


def _sdpa_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, ungroup) -> torch.Tensor:
    return ungroup(F.scaled_dot_product_attention(group(q), group(k), group(v)))


def scoped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, scope: AttentionScope
) -> torch.Tensor:
    """Dense attention of B same-grid clips inside `scope`: q, k, v (B, H, N, Dh) -> (B, H, N, Dh).

    Groups are reshaped out of the token order, so each SDPA call is a batch of equal, short sequences.
    A ragged last window is a second call over the remaining frames: memory and time stay those of the
    windows actually attended, never those of a mask over all N tokens.
    """
    b, h, n, d = q.shape
    gt, gh, gw = grid
    s = gh * gw
    window = scope.window if 0 < scope.window < gt else 0
    if scope.kind == "full" and not window:
        return F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
    if scope.kind == "spatial":
        return _sdpa_groups(
            q,
            k,
            v,
            lambda x: x.reshape(b, h, gt, s, d).transpose(1, 2).reshape(b * gt, h, s, d),  # (B*T', H, S, Dh)
            lambda o: o.reshape(b, gt, h, s, d).transpose(1, 2).reshape(b, h, n, d),  # (B, H, N, Dh)
        )
    w = window or gt
    full, rest = divmod(gt, w)
    if scope.kind == "temporal":
        # (B, H, T', S, Dh) -> per (b, s): the frames of one spatial position, cut into windows.
        qs, ks, vs = (x.reshape(b, h, gt, s, d).permute(0, 3, 1, 2, 4) for x in (q, k, v))  # (B, S, H, T', Dh)
        outs = []
        for t0, length, count in ((0, full * w, full), (full * w, rest, 1)):
            if length == 0:
                continue
            wl = length // count

            def group(x, t0=t0, length=length, count=count, wl=wl):
                x = (
                    x[:, :, :, t0 : t0 + length].reshape(b, s, h, count, wl, d).permute(0, 1, 3, 2, 4, 5)
                )  # (B, S, c, H, wl, Dh)
                return x.reshape(b * s * count, h, wl, d)  # (B*S*c, H, wl, Dh)

            out = F.scaled_dot_product_attention(group(qs), group(ks), group(vs))
            outs.append(out.reshape(b, s, count, h, wl, d).permute(0, 1, 3, 2, 4, 5).reshape(b, s, h, length, d))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # (B, S, H, T', Dh)
        return out.permute(0, 2, 3, 1, 4).reshape(b, h, n, d)  # (B, H, N, Dh)
    # full attention inside blocks of w frames: in t-major order a window is a contiguous run of w*S tokens.
    outs = []
    for n0, length, count in ((0, full * w * s, full), (full * w * s, rest * s, 1)):
        if length == 0:
            continue

        def group(x, n0=n0, length=length, count=count):
            x = x[:, :, n0 : n0 + length].reshape(b, h, count, length // count, d).transpose(1, 2)  # (B, c, H, wS, Dh)
            return x.reshape(b * count, h, length // count, d)  # (B*c, H, wS, Dh)

        out = F.scaled_dot_product_attention(group(q), group(k), group(v))  # (B*c, H, wS, Dh)
        outs.append(out.reshape(b, count, h, length // count, d).transpose(1, 2).reshape(b, h, length, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, N, Dh)


QKNormOver = Literal["head", "width"]


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` that scales in its input's dtype: under bf16 autocast the projections hand it bf16, and a
    bf16 input with an fp32 weight misses the fused kernel (torch warns, measured on an H200) and comes out fp32.
    The statistics are still accumulated in fp32 by the kernel; weights and state-dict keys are nn.RMSNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        fast = x.device.type == "cpu" and x.dtype == torch.float32 and len(self.normalized_shape) == 1
        if fast and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Eager CPU inference: one reduction and two passes, where the CPU rms_norm (pow, mean, rsqrt, two products)
            # makes five; 1.7x faster on a (1950, 1536) input, the same values to float rounding.
            rstd = (
                torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
            )  # (..., 1)
            out = x * rstd
            return out if weight is None else out.mul_(weight)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def qk_norms(dim: int, head_dim: int, enabled: bool, over: QKNormOver) -> tuple[nn.Module, nn.Module]:
    """The query and key RMSNorms: over each head's dims (`head`) or over all heads at once (`width`, Wan)."""
    if not enabled:
        return nn.Identity(), nn.Identity()
    width = dim if over == "width" else head_dim
    return RMSNorm(width, eps=1e-6), RMSNorm(width, eps=1e-6)


def _norm_heads(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """RMS-normalise (..., H, Dh) heads with `norm`, whose width is Dh (per head) or H * Dh (across heads)."""
    if isinstance(norm, nn.Identity) or norm.normalized_shape[0] == x.shape[-1]:
        return norm(x)
    return norm(x.flatten(-2)).unflatten(-1, x.shape[-2:])  # (..., H, Dh)


def _qk_norm(qk: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module) -> torch.Tensor:
    """RMS-normalise stacked queries and keys (B, N, 2, H, Dh), each through its own module.

    Calling the modules (rather than reading their weights into one fused op) is what lets DeepSpeed
    ZeRO-3 gather a partitioned weight: it does so in the module's forward hook.
    """
    if isinstance(q_norm, nn.Identity):
        return qk
    return torch.stack([_norm_heads(qk[:, :, 0], q_norm), _norm_heads(qk[:, :, 1], k_norm)], dim=2)  # (B, N, 2, H, Dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE, restricted to a scope.

    Queries and keys are normalised and rotated together, in the (B, N, H, Dh) layout the QKV
    projection produces; SDPA reads them through transposed views, so the spatial and full scopes
    copy nothing between the projection and the output (only temporal grouping must gather).
    `hook` (None by default) wraps the local attention: sequence parallelism sets it from outside.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, qk_norm_over: QKNormOver = "head"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = qk_norms(dim, self.head_dim, qk_norm, qk_norm_over)
        self.proj = nn.Linear(dim, dim)
        self.hook: AttentionHook | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, layout: TokenLayout, scope: AttentionScope) -> torch.Tensor:
        b, n, dim = x.shape
        qk, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).split((2, 1), dim=2)  # (B, N, 2|1, H, Dh)
        qk = apply_rope(_qk_norm(qk, self.q_norm, self.k_norm), rope)  # (B, N, 2, H, Dh)
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # (B, H, N, Dh) views
        v = v.squeeze(2).transpose(1, 2)  # (B, H, N, Dh) view

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if not layout.packed:
                return scoped_attention(q, k, v, layout.segments[0][0], scope)  # (B, H, N, Dh)
            parts = zip(*(layout.split(t.transpose(1, 2)) for t in (q, k, v)), layout.segments)  # (c, N_seg, H, Dh)
            outs = [
                scoped_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), grid, scope).transpose(
                    1, 2
                )
                for qs, ks, vs, (grid, _) in parts
            ]
            return layout.merge(outs).transpose(1, 2)  # (1, H, ΣN, Dh)

        out = attend(q, k, v) if self.hook is None else self.hook(q, k, v, attend)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))  # (B, N, D)


class CrossAttention(nn.Module):
    """Queries from video tokens, keys and values from their own clip's text tokens (article 3.2), text-masked."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, qk_norm_over: QKNormOver = "head"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = qk_norms(dim, self.head_dim, qk_norm, qk_norm_over)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None, layout: TokenLayout
    ) -> torch.Tensor:
        """context_mask (clips, L): bool, True for tokens to attend; or float, added to the logits (the log-weights
        of `captions.collapse_zero_padding`); None attends to all L (padding included)."""
        b, n, dim = x.shape
        q = _norm_heads(self.q(x).unflatten(-1, (self.num_heads, self.head_dim)), self.q_norm)  # (B, N, H, Dh)
        kv = self.kv(context).unflatten(-1, (2, self.num_heads, self.head_dim))  # (clips, L, 2, H, Dh)
        k, v = _norm_heads(kv[:, :, 0], self.k_norm).transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (clips, H, L, Dh)
        if context_mask is None:
            masks = [None] * len(layout.segments)
        else:
            if context_mask.is_floating_point():
                context_mask = context_mask.to(q.dtype)  # SDPA takes a float mask in the queries' dtype
            masks = layout.per_clip(context_mask[:, None, None, :])  # (c, 1, 1, L) each
        parts = zip(layout.split(q), layout.per_clip(k), layout.per_clip(v), masks)
        outs = [
            F.scaled_dot_product_attention(qs.transpose(1, 2), ks, vs, attn_mask=ms).transpose(1, 2)
            for qs, ks, vs, ms in parts
        ]  # (c, N_seg, H, Dh) each
        return self.proj(layout.merge(outs).reshape(b, n, dim))  # (B, N, D)
