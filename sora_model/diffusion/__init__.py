"""The noise process, apart from the network: schedules, training timesteps, samplers and training losses.

diff = build_diffusion(cfg.diffusion)
losses = diff.training_losses(model_fn, x0, loss_cfg, generator=g, num_tokens=n)
video = diff.sample(model_fn, (B, C, T, H, W), generator=g)

Names load on first use (PEP 562), so `sora_model.config` can import the sampler registry
(`sora_model.diffusion.registry`, pure Python) without pulling in torch or itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "losses": (
        "LOSS_KEYS",
        "combine_losses",
        "load_perceptual_network",
        "motion_smoothness_loss",
        "perceptual_loss",
        "temporal_consistency_loss",
    ),
    "registry": ("SAMPLERS", "SAMPLER_NAMES", "STOCHASTIC_SAMPLERS", "SamplerSpec", "is_stochastic", "sampler_help"),
    "samplers": ("flow_time_grid", "respace_timesteps", "sampler_nfe"),
    "multistep": ("dpm_flow_sigmas", "dpmpp_sample", "unipc_flow_sigmas", "unipc_sample"),
    "schedules": (
        "FLOW_TIMESTEP_SCALE",
        "Diffusion",
        "GaussianDiffusion",
        "ModelFn",
        "PackedModelFn",
        "RectifiedFlow",
        "build_diffusion",
        "linear_betas",
    ),
    "timesteps": (
        "effective_shift",
        "sample_adaptive_timesteps",
        "sample_flow_timesteps",
        "sample_uniform_timesteps",
        "shift_timesteps",
        "video_complexity",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sora_model.diffusion' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"sora_model.diffusion.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
