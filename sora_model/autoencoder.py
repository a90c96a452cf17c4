"""The space diffusion runs in: pixels (identity) or the latents of a pretrained `diffusers` VAE.

Model space is (B, C, T, H, W) float. Pixels enter as uint8 (B, T, H, W, 3) and are mapped to [-1, 1]
by :func:`pixels_to_model`; an autoencoder then maps [-1, 1] video to its latents and back.

Latent normalisation (so diffusion sees roughly unit-variance latents), with every number taken from
the config or the VAE's own config, never hard-coded:

    z_model = ((z - mean_c) / std_c - shift) * scale

* z is the posterior mean (deterministic: the same clip always gives the same latents, so
  pre-computed latents and on-the-fly ones agree).
* mean_c / std_c: a 3D VAE's per-channel `latents_mean` / `latents_std` when its config (or a buffer)
  has them (Wan, Mochi, LTX), as their own diffusers pipelines apply them; absent, or a 2D VAE -> 0 / 1.
* shift: `autoencoder.shift_factor`, else the VAE config's `shift_factor`, else 0.
* scale: `autoencoder.scaling_factor`, else the VAE config's `scaling_factor`, else 1.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sora_model.config import AutoencoderConfig

PIXEL_CHANNELS = 3
FRAME_CHUNK = 16
"""Frames a 2D VAE encodes or decodes at once: folding all of B*T into one batch can exhaust memory."""


def pixels_to_model(frames_uint8: Tensor) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [-1, 1]."""
    if frames_uint8.ndim != 5 or frames_uint8.shape[-1] != PIXEL_CHANNELS:
        raise ValueError(f"frames must be (B, T, H, W, 3), got shape {tuple(frames_uint8.shape)}")
    if frames_uint8.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames_uint8.dtype}")
    return frames_uint8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, 3, T, H, W)


def model_to_pixels(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8, clamped and rounded."""
    if video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()  # (B, T, H, W, 3)


class Autoencoder(nn.Module, metaclass=abc.ABCMeta):
    """Maps [-1, 1] video to model space and back.

    `temporal_factor` > 1 means a causal video VAE: the first frame is encoded alone and each further
    latent frame covers `temporal_factor` frames, so clips need 1 + k * temporal_factor frames.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    odd_latent_frames: bool = False
    """CogVideoX decodes only an odd number of latent frames back to 1 + k * temporal_factor frames."""

    @abc.abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T', H', W') model-space latents."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, T', H', W') model-space latents -> (B, 3, T, H, W), about [-1, 1], not clamped."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of a clip; ValueError when the clip does not fit the compression factors."""
        sf, tf = self.spatial_factor, self.temporal_factor
        if frames < 1 or height < 1 or width < 1:
            raise ValueError(f"frames, height and width must be >= 1, got {frames}x{height}x{width}")
        if height % sf or width % sf:
            raise ValueError(f"height and width must be multiples of {sf} for this autoencoder, got {height}x{width}")
        if tf == 1:
            return frames, height // sf, width // sf
        if (frames - 1) % tf:
            raise ValueError(f"frames must be 1 + a multiple of {tf} for this autoencoder, got {frames}")
        latent_t = (frames - 1) // tf + 1
        if self.odd_latent_frames and latent_t % 2 == 0:
            raise ValueError(f"frames must be 1 + a multiple of {2 * tf} for this autoencoder, got {frames}")
        return latent_t, height // sf, width // sf

    def frames_for_latent(self, latent_frames: int) -> int:
        """Inverse of the temporal part of `latent_shape`: frames a decode of `latent_frames` gives."""
        return latent_frames if self.temporal_factor == 1 else (latent_frames - 1) * self.temporal_factor + 1


class IdentityAutoencoder(Autoencoder):
    """Diffusion in pixel space: the CPU default, no weights, exact round trip."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_channels, self.spatial_factor, self.temporal_factor = PIXEL_CHANNELS, 1, 1

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents


# ---------------------------------------------------------------------------------------------
# diffusers VAEs
# ---------------------------------------------------------------------------------------------


def _cfg(vae: Any, key: str) -> Any:
    return vae.config.get(key) if hasattr(vae.config, "get") else getattr(vae.config, key, None)


def _downsamples_2d(vae: Any) -> tuple[int, int]:
    # AutoencoderKL halves H and W in every down block but the last.
    return 2 ** (len(_cfg(vae, "block_out_channels")) - 1), 1


def _factors_cogvideox(vae: Any) -> tuple[int, int]:
    # Down blocks but the last halve H, W; the first log2(temporal_compression_ratio) of those also halve T.
    spatial_levels = len(_cfg(vae, "block_out_channels")) - 1
    temporal_levels = min(int(math.log2(_cfg(vae, "temporal_compression_ratio"))), spatial_levels)
    return 2**spatial_levels, 2**temporal_levels


def _factors_wan(vae: Any) -> tuple[int, int]:
    # One spatial halving per `temperal_downsample` entry, a temporal one where it is True; Wan 2.2
    # additionally folds `patch_size` x `patch_size` pixels into channels first. The config's
    # scale_factor_* fields are defaults that need not match the blocks, so the blocks decide.
    downs = list(_cfg(vae, "temperal_downsample"))
    return 2 ** len(downs) * int(_cfg(vae, "patch_size") or 1), 2 ** sum(bool(d) for d in downs)


def _factors_attrs(vae: Any) -> tuple[int, int]:
    # These classes compute their own ratios from their blocks (Mochi, LTX) or take them as config.
    return int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio)


VAE_CLASSES: dict[str, tuple[bool, Callable[[Any], tuple[int, int]]]] = {
    # class name: (is a 3D video VAE, rule giving (spatial, temporal) compression)
    "AutoencoderKL": (False, _downsamples_2d),
    "AutoencoderKLCogVideoX": (True, _factors_cogvideox),
    "AutoencoderKLWan": (True, _factors_wan),
    "AutoencoderKLHunyuanVideo": (True, _factors_attrs),
    "AutoencoderKLLTXVideo": (True, _factors_attrs),
    "AutoencoderKLMochi": (True, _factors_attrs),
}


class DiffusersAutoencoder(Autoencoder):
    """A `diffusers` VAE from a local folder saved with `save_pretrained`, frozen, in eval mode.

    2D VAEs (AutoencoderKL) run per frame with T folded into the batch; 3D video VAEs encode whole
    clips. Compression factors come from the loaded model (see VAE_CLASSES for the rule per class).
    """

    def __init__(
        self, path: str, scaling_factor: float | None = None, shift_factor: float | None = None, tiling: bool = True
    ) -> None:
        super().__init__()
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"autoencoder.path '{path}' has no config.json: give a local folder saved by diffusers' save_pretrained"
            )
        class_name = json.loads(config_file.read_text()).get("_class_name")
        if class_name not in VAE_CLASSES:
            raise ValueError(
                f"autoencoder.path '{path}' holds a {class_name}, which is not supported; supported: "
                f"{', '.join(VAE_CLASSES)}"
            )
        import diffusers

        if not hasattr(diffusers, class_name):
            raise ValueError(f"the installed diffusers {diffusers.__version__} has no {class_name}; upgrade diffusers")
        vae = getattr(diffusers, class_name).from_pretrained(str(folder), local_files_only=True)
        vae.eval().requires_grad_(False)  # frozen: diffusion trains on its latents, never the VAE
        if tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()  # long clips decode tile by tile instead of all at once (AutoencoderConfig.tiling)
        self.vae = vae
        self.class_name = class_name
        self.is_video, rule = VAE_CLASSES[class_name]
        self.spatial_factor, self.temporal_factor = rule(vae)
        self.odd_latent_frames = class_name == "AutoencoderKLCogVideoX"
        self.latent_channels = int(_cfg(vae, "latent_channels") or _cfg(vae, "z_dim"))

        # Normalisation (module docstring). Buffers, so .to(device) moves them with the VAE.
        config_scale, config_shift = _cfg(vae, "scaling_factor"), _cfg(vae, "shift_factor")
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config_scale or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None else config_shift or 0.0)
        mean, std = self._channel_stats(vae)
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", mean.reshape(shape), persistent=False)
        self.register_buffer("latents_std", std.reshape(shape), persistent=False)

    def _channel_stats(self, vae: Any) -> tuple[Tensor, Tensor]:
        ones, zeros = torch.ones(self.latent_channels), torch.zeros(self.latent_channels)
        if not self.is_video:
            # SDXL-style 2D configs may carry latents_mean for other pipelines; their own use plain KL scaling.
            return zeros, ones
        mean, std = _cfg(vae, "latents_mean"), _cfg(vae, "latents_std")
        if mean is None or std is None:  # LTX keeps them as buffers rather than config entries
            buffers = dict(vae.named_buffers(recurse=False))
            mean, std = buffers.get("latents_mean"), buffers.get("latents_std")
        if mean is None or std is None:
            return zeros, ones
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"VAE latents_mean/latents_std have {mean.numel()} entries, expected {self.latent_channels}"
            )
        return mean, std

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _per_frame(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Run a 2D VAE function over (B, C, T, H, W) frame by frame, FRAME_CHUNK frames at a time."""
        b, c, t, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        out = torch.cat([fn(chunk) for chunk in flat.split(FRAME_CHUNK)])  # (B*T, C', H', W')
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C', T, H', W')

    def encode(self, video: Tensor) -> Tensor:
        if video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
            raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])  # a clear error before the VAE fails deep inside
        x = video.to(self._dtype)

        def enc(v: Tensor) -> Tensor:
            return self.vae.encode(v).latent_dist.mean  # posterior mean: deterministic

        z = (enc(x) if self.is_video else self._per_frame(x, enc)).float()  # (B, C, T', H', W')
        return ((z - self.latents_mean) / self.latents_std - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, T', H', W'), got shape {tuple(latents.shape)}"
            )
        if self.odd_latent_frames and latents.shape[2] % 2 == 0:
            raise ValueError(f"{self.class_name} decodes an odd number of latent frames, got {latents.shape[2]}")
        z = (latents.float() / self.scaling_factor + self.shift_factor) * self.latents_std + self.latents_mean
        z = z.to(self._dtype)

        def dec(v: Tensor) -> Tensor:
            return self.vae.decode(v).sample

        return (dec(z) if self.is_video else self._per_frame(z, dec)).float()  # (B, 3, T, H, W)


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """The autoencoder a config names; a missing VAE folder is a one-line FileNotFoundError."""
    if cfg.kind == "identity":
        return IdentityAutoencoder()
    if cfg.kind == "diffusers":
        if not cfg.path or not Path(cfg.path).is_dir():
            raise FileNotFoundError(
                f"autoencoder.path '{cfg.path}' not found: give a local folder saved by diffusers' save_pretrained"
            )
        return DiffusersAutoencoder(cfg.path, cfg.scaling_factor, cfg.shift_factor, tiling=cfg.tiling)
    raise ValueError(f"unknown autoencoder.kind '{cfg.kind}'; choose 'identity' or 'diffusers'")
