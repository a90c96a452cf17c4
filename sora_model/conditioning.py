"""How the timestep (and pooled caption) condition the DiT: the timestep embedder and adaLN modulation.

Two ways to turn the condition c into each block's shift, scale and gate (`DiTConfig.modulation`):

- `per_block` (DiT's adaLN-Zero): every block and the output head own a SiLU-Linear of c.
- `shared` (Wan, PixArt-alpha's adaLN-single): one SiLU-Linear of c, computed once per forward pass, serves
  every block; each block adds its own learned (6, D) table to it. The output head adds a (2, D) table to c
  itself. Numerically the same maths as per-block modulation with the Linear hoisted out and shared.

The whole condition path computes in fp32 whatever the weights' dtype (`precision.py`): its Linears are
`FP32Linear`, so the shift, scale and gate of every token, and the residual stream they gate, never round to
bf16, whether the weights are fp32, bf16 inference weights, or DeepSpeed's all-bf16 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .precision import FP32Linear

TIMESTEP_MAX_PERIOD = 10000.0
"""Longest sinusoid period of the timestep features: covers the DDPM range 0..1000 (DiT's and Wan's value)."""


def full_precision(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` on fp32 input outside autocast, returned in fp32: the adaLN projections (`FP32Linear`) compute
    in fp32 on their upcast weights, so modulation keeps fp32 precision under autocast and with bf16 weights.
    Without autocast and with fp32 weights this is exactly `module(x)`."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float()).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal features (cos, then sin) -> MLP; the same as diffusers' `Timesteps`
    (flip_sin_to_cos, no frequency shift) followed by `TimestepEmbedding`, which Wan uses."""

    def __init__(self, hidden_size: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(FP32Linear(freq_dim, hidden_size), nn.SiLU(), FP32Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, D) fp32, whatever the MLP weights' dtype."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]  # (B, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F)
        return self.mlp(emb)  # (B, D) fp32


def adaln_projection(hidden_size: int, chunks: int) -> nn.Sequential:
    """SiLU then Linear(D, chunks * D): adaLN's map from the condition to shifts, scales and gates (fp32)."""
    return nn.Sequential(nn.SiLU(), FP32Linear(hidden_size, chunks * hidden_size))


class ModulationTable(nn.Module):
    """A learned (chunks, D) table added to a shared modulation (Wan's `scale_shift_table`).

    The table is read inside this module's own forward, so DeepSpeed ZeRO-3 gathers it there.
    """

    def __init__(self, chunks: int, hidden_size: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(chunks, hidden_size))

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        """(clips, chunks * D) shared modulation -> (clips, chunks * D) fp32, this block's."""
        return shared.float() + self.table.float().flatten()  # (clips, chunks * D)
