"""Feature extractors for FID (frames) and FVD (clips), loaded from a local file, never a download.

Two formats:

- TorchScript (`.pt`, `.pth`, `.ts`, `.jit`): a module taking float32 pixels in [0, 1]. It gets
  frames as (N, 3, H, W) for FID; for FVD it gets clips as (B, 3, T, H, W) when it accepts 5-D input
  (an I3D, say), otherwise the clip's feature is its frame features' mean and temporal std
  concatenated (recorded as `fvd_features: "frame-stats"` in metrics.json).
- safetensors (`.safetensors`) holding `SmallVideoEncoder` weights, its config in the file's
  metadata (`architecture`, `config`): a Conv3d stack that takes frames as one-frame clips, so one
  file serves FID and FVD. `save_small_encoder` writes one (random weights make a usable, if weak,
  fixed embedding; train it however you like).

Every output is flattened to (N, D) features.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

TORCHSCRIPT_EXTENSIONS = (".pt", ".pth", ".ts", ".jit")
SAFETENSORS_EXTENSION = ".safetensors"
ARCHITECTURE = "sora-small-video-encoder"
"""The `architecture` metadata value of a safetensors feature file this module can rebuild."""
BATCH = 64
"""Frames or clips per forward pass: bounded memory for any number of samples."""


@dataclass
class SmallVideoEncoderConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    """Width of each Conv3d stage; each stage after the first halves H and W."""
    temporal_kernel: int = 3
    """Temporal extent of each convolution; padded, so a one-frame clip (an image) passes through."""


class SmallVideoEncoder(nn.Module):
    """Conv3d stages + global average pooling: (B, 3, T, H, W) in [0, 1] -> (B, channels[-1])."""

    def __init__(self, config: SmallVideoEncoderConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        kt = config.temporal_kernel
        for k, cout in enumerate(config.channels):
            stride = (1, 1, 1) if k == 0 else (1, 2, 2)
            layers += [nn.Conv3d(cin, cout, (kt, 3, 3), stride=stride, padding=(kt // 2, 1, 1)), nn.GELU()]
            cin = cout
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1).mean(dim=(2, 3, 4))  # (B, C)


def save_small_encoder(path: str, config: SmallVideoEncoderConfig | None = None, seed: int = 0) -> str:
    """Write a `SmallVideoEncoder` (seeded random weights) as safetensors with its config in the metadata."""
    from safetensors.torch import save_file

    config = config or SmallVideoEncoderConfig()
    torch.manual_seed(seed)
    model = SmallVideoEncoder(config)
    meta = {"architecture": ARCHITECTURE, "config": json.dumps(asdict(config))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    return path


class FeatureExtractor:
    """Frame features (FID) and clip features (FVD) from one local network."""

    def __init__(self, module: nn.Module, path: str, takes_video: bool | None = None, device: str = "cpu"):
        self.module = module.eval().to(device)
        self.path = path
        self.device = torch.device(device)
        self._takes_video = takes_video

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(x), BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(x[i : i + BATCH])).to(self.device)
            out = self.module(batch)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.float().reshape(len(batch), -1).cpu().numpy())
        return np.concatenate(outs)

    def frame_features(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, D)."""
        x = np.asarray(frames, dtype=np.float32).transpose(0, 3, 1, 2) / 255.0  # (N, 3, H, W)
        if isinstance(self.module, SmallVideoEncoder):
            x = x[:, :, None]  # (N, 3, 1, H, W): an image is a one-frame clip
        return self._run(x)

    @property
    def takes_video(self) -> bool:
        return bool(self._takes_video)

    def clip_features(self, clips: np.ndarray) -> np.ndarray:
        """(B, T, H, W, 3) uint8 -> (B, D): the network's video features, or frame-feature statistics."""
        clips = np.asarray(clips)
        x = clips.astype(np.float32).transpose(0, 4, 1, 2, 3) / 255.0  # (B, 3, T, H, W)
        if self._takes_video is None:
            try:
                self._run(x[:1])
                self._takes_video = True
            except Exception:  # noqa: BLE001 - any failure on 5-D input means a frame network
                self._takes_video = False
        if self._takes_video:
            return self._run(x)
        b, t = clips.shape[:2]
        f = self.frame_features(clips.reshape(b * t, *clips.shape[2:])).reshape(b, t, -1)  # (B, T, D)
        return np.concatenate([f.mean(axis=1), f.std(axis=1)], axis=1)  # (B, 2D)


def load_feature_extractor(path: str, device: str = "cpu", option: str = "--features") -> FeatureExtractor:
    """A TorchScript file or a `SmallVideoEncoder` safetensors file; one-line errors name the path and option."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"feature extractor not found: {path} ({option} takes a local TorchScript "
            f"{'/'.join(TORCHSCRIPT_EXTENSIONS)} file or a {SAFETENSORS_EXTENSION} file written by "
            "pipelines.evaluate.features.save_small_encoder)"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == SAFETENSORS_EXTENSION:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("architecture") != ARCHITECTURE:
            raise ValueError(
                f"{option} {path}: safetensors metadata 'architecture' is {meta.get('architecture')!r}, "
                f"expected '{ARCHITECTURE}' (write one with pipelines.evaluate.features.save_small_encoder)"
            )
        raw = json.loads(meta.get("config", "{}"))
        config = SmallVideoEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = SmallVideoEncoder(config)
        model.load_state_dict(load_file(path))
        return FeatureExtractor(model, path, takes_video=True, device=device)
    if ext in TORCHSCRIPT_EXTENSIONS:
        try:
            module = torch.jit.load(path, map_location=device)
        except RuntimeError as err:
            raise ValueError(f"{option} {path} is not a TorchScript file: {str(err).splitlines()[0]}") from None
        return FeatureExtractor(module, path, device=device)
    raise ValueError(
        f"{option} {path}: unknown extension '{ext}'; use TorchScript ({', '.join(TORCHSCRIPT_EXTENSIONS)}) or "
        f"{SAFETENSORS_EXTENSION}"
    )
