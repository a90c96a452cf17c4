"""Where on the noise path each sample goes: training timesteps drawn per clip, and the flow time shift.

DDPM chains draw integer indices, uniform or (the article's adaptive noise level, 3.1) biased toward noise by the
clip's `video_complexity`; rectified flow draws times in [0, 1], logit-normal or uniform, then shifted toward noise
(`shift_timesteps`), more so for larger clips (`effective_shift`). `schedules.py` calls these; sampling uses the same
shift on its time grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sora_model.config import DiffusionConfig

COMPLEXITY_EPS = 1e-6
"""Guards the complexity ratio for constant clips (zero deviation); they get complexity 0."""
WHITE_NOISE_ROUGHNESS = math.sqrt(2.0)
"""E|a - b| / E|a - E a| for independent Gaussian a, b: the roughness of white noise, which defines complexity 1."""


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): moves flow time toward noise for s > 1, keeps 0 and 1 fixed (SD3)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def effective_shift(cfg: DiffusionConfig, num_tokens: int | None) -> float:
    """The resolution/length shift: cfg.shift * sqrt(num_tokens / cfg.shift_reference_tokens).

    Larger or longer clips keep more structure at a given noise level (neighbouring tokens average the
    noise away), so they need their time pushed toward noise. Without a reference, or when the caller
    does not know the token count (num_tokens None), the plain cfg.shift applies.
    """
    if cfg.shift_reference_tokens and num_tokens:
        return cfg.shift * math.sqrt(num_tokens / cfg.shift_reference_tokens)
    return cfg.shift


def video_complexity(x0: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B,) complexity in [0, 1]: how rough the clip is in space and time.

    Roughness along an axis is mean |x[i+1] - x[i]| divided by the clip's mean absolute deviation, which
    makes it independent of the space's scale (pixels in [-1, 1] or VAE latents) and lies in [0, 2].
    Dividing by white noise's roughness sqrt(2) and clamping gives [0, 1]: 0 for flat or static content,
    1 for content as rough as noise. Complexity averages the spatial roughness (H and W) with the
    temporal one; images (T = 1) use the spatial part alone.
    """
    x = x0.detach().float()
    scale = (x - x.mean(dim=(2, 3, 4), keepdim=True)).abs().flatten(1).mean(dim=1) + COMPLEXITY_EPS  # (B,)

    def roughness(axis: int) -> Tensor:
        return x.diff(dim=axis).abs().flatten(1).mean(dim=1) / scale  # (B,)

    spatial = 0.5 * (roughness(3) + roughness(4))  # (B,)
    rough = spatial if x.shape[2] < 2 else 0.5 * (spatial + roughness(2))
    return (rough / WHITE_NOISE_ROUGHNESS).clamp(0.0, 1.0)


def sample_uniform_timesteps(
    num_train_timesteps: int, batch: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(B,) integer DDPM training indices, uniform over [0, T)."""
    where = generator.device if generator is not None else device
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=where).to(device)


def sample_adaptive_timesteps(
    num_train_timesteps: int,
    complexity: Tensor,
    strength: float,
    generator: torch.Generator | None,
) -> Tensor:
    """(B,) integer indices biased toward noise for complex clips (the article's adaptive noise level).

    t_frac = 1 - (1 - u)^(1 + strength * c), u ~ U[0, 1): c = 0 is uniform; larger c moves mass to
    large t, because complex clips keep recognisable structure at noise levels that wipe out simple ones.
    The map is monotone in u, so every level keeps non-zero probability.
    """
    where = generator.device if generator is not None else complexity.device
    u = torch.rand(complexity.shape, generator=generator, device=where, dtype=torch.float64).to(complexity.device)
    t_frac = 1.0 - (1.0 - u) ** (1.0 + strength * complexity.double())
    return (t_frac * num_train_timesteps).floor().long().clamp(0, num_train_timesteps - 1)


def sample_flow_timesteps(
    cfg: DiffusionConfig,
    batch: int,
    generator: torch.Generator | None,
    device: torch.device,
    num_tokens: int | None = None,
) -> Tensor:
    """(B,) flow times in [0, 1]: logit-normal or uniform per cfg.timestep_sampling, then shifted."""
    where = generator.device if generator is not None else device
    if cfg.timestep_sampling == "logit_normal":
        z = torch.randn((batch,), generator=generator, device=where)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    else:
        t = torch.rand((batch,), generator=generator, device=where)
    return shift_timesteps(t, effective_shift(cfg, num_tokens)).to(device)
