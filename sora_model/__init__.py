"""sora_model: the pure-PyTorch model package every stage imports (never ray, deepspeed or torch.distributed)."""

from .config import (
    DIT_PRESETS,
    AutoencoderConfig,
    ConfigError,
    DiffusionConfig,
    DiTConfig,
    LossConfig,
    PipelineConfig,
    SampleConfig,
    TextEncoderConfig,
    dit_preset,
)

__all__ = [
    "DIT_PRESETS",
    "AutoencoderConfig",
    "ConfigError",
    "DiTConfig",
    "DiffusionConfig",
    "LossConfig",
    "PipelineConfig",
    "SampleConfig",
    "TextEncoderConfig",
    "dit_preset",
]
