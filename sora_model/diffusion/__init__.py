"""The noise process, apart from the network: schedules, samplers and training losses.

diff = build_diffusion(cfg.diffusion)
losses = diff.training_losses(model_fn, x0, loss_cfg, generator=g, num_tokens=n)
video = diff.sample(model_fn, (B, C, T, H, W), generator=g)
"""

from sora_model.diffusion.losses import (
    LOSS_KEYS,
    combine_losses,
    load_perceptual_network,
    motion_smoothness_loss,
    perceptual_loss,
    temporal_consistency_loss,
)
from sora_model.diffusion.samplers import SAMPLER_NAMES, flow_time_grid, respace_timesteps, sampler_nfe
from sora_model.diffusion.schedules import (
    FLOW_TIMESTEP_SCALE,
    Diffusion,
    GaussianDiffusion,
    ModelFn,
    PackedModelFn,
    RectifiedFlow,
    build_diffusion,
    effective_shift,
    linear_betas,
    sample_adaptive_timesteps,
    sample_flow_timesteps,
    sample_uniform_timesteps,
    shift_timesteps,
    video_complexity,
)

__all__ = [
    "FLOW_TIMESTEP_SCALE",
    "LOSS_KEYS",
    "SAMPLER_NAMES",
    "Diffusion",
    "GaussianDiffusion",
    "ModelFn",
    "PackedModelFn",
    "RectifiedFlow",
    "build_diffusion",
    "combine_losses",
    "effective_shift",
    "flow_time_grid",
    "linear_betas",
    "load_perceptual_network",
    "motion_smoothness_loss",
    "perceptual_loss",
    "respace_timesteps",
    "sample_adaptive_timesteps",
    "sample_flow_timesteps",
    "sample_uniform_timesteps",
    "sampler_nfe",
    "shift_timesteps",
    "temporal_consistency_loss",
    "video_complexity",
]
