"""Spatio-temporal patches (article 1.2): Conv3d patch embedding and its exact inverse.

Token layout, relied on by the data pipeline, the model and the trainer:
- tokens are ordered t-major: index = (t * H' + h) * W' + w over the grid (T', H', W') = (T/p_t, H/p_h, W/p_w);
- one token is a patch flattened in (C, p_t, p_h, p_w) order, which is exactly how a Conv3d weight
  (D, C, p_t, p_h, p_w) flattens, so `PatchEmbed` on a video equals a Linear on its patchified tokens.
Images are videos of one frame (T = 1), which needs p_t = 1.
"""

from __future__ import annotations

import torch
from torch import nn


def patch_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (T', H', W') of a (T, H, W) clip; a clear error when the clip does not divide."""
    names = ("frames", "height", "width")
    for size, p, name in zip(shape, patch, names):
        if size < 1:
            raise ValueError(f"clip {name} must be >= 1, got {size}")
        if size % p:
            raise ValueError(
                f"clip {name} {size} is not divisible by the patch size {p} "
                f"(clip T×H×W {shape[0]}×{shape[1]}×{shape[2]}, patch {patch[0]}×{patch[1]}×{patch[2]})"
            )
    return (shape[0] // patch[0], shape[1] // patch[1], shape[2] // patch[2])


def patchify(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C*p_t*p_h*p_w) tokens in t-major order."""
    if video.ndim != 5:
        raise ValueError(f"patchify expects (B, C, T, H, W), got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    gt, gh, gw = patch_grid((t, h, w), patch)
    pt, ph, pw = patch
    x = video.reshape(b, c, gt, pt, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    return x.reshape(b, gt * gh * gw, c * pt * ph * pw)  # (B, N, P)


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """(B, N, C*p_t*p_h*p_w) -> (B, C, T, H, W); the exact inverse of `patchify`."""
    b, n, p = tokens.shape
    gt, gh, gw = grid
    pt, ph, pw = patch
    if n != gt * gh * gw or p != channels * pt * ph * pw:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not match grid {grid}, patch {patch}, {channels} channels "
            f"(expected N={gt * gh * gw}, P={channels * pt * ph * pw})"
        )
    x = tokens.reshape(b, gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """(N, 3) integer (t, h, w) coordinates of a grid's tokens, in token order."""
    gt, gh, gw = grid
    t, h, w = torch.meshgrid(
        torch.arange(gt, device=device), torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
    )
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch: one linear map per non-overlapping (p_t, p_h, p_w) patch."""

    def __init__(self, in_channels: int, hidden_size: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = tuple(patch)
        self.in_channels = in_channels
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) video, or (B, N, P) pre-patchified tokens -> (B, N, D).

        Both go through the Conv3d module (tokens as N one-patch videos), never by reading its weight:
        under DeepSpeed ZeRO-3 a weight is only gathered inside its own module's call.
        """
        if x.ndim == 3:
            b, n, _ = x.shape
            patches = x.reshape(b * n, self.in_channels, *self.patch)  # (B*N, C, pt, ph, pw)
            return self.proj(patches).reshape(b, n, -1)  # (B, N, D)
        # The video as its patches, through the same Conv3d: contiguous (B, N, D) tokens (the residual stream every
        # block reads and adds to; a transposed (B, D, N) view would make each later norm and add strided), and on
        # CPU 1.6x faster than the strided Conv3d over the whole clip (which `patchify` checks divides).
        return self(patchify(x, self.patch))  # (B, N, D)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, P) pre-patchified tokens -> (B, N, D); equals `forward` on the unpatchified video."""
        return self(tokens)
