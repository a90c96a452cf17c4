"""`--image-conditioning`: each clip's image-to-video condition, made beside its patches from the same pixels.

The first frame (and for FLF2V the last) of the decoded clip, at the bucket's size, goes through
`sora_model.i2v_condition.condition_channels` (the conditioning video through the export's VAE, with its mask) and
the export's image encoder: what `TextToVideoPipeline.sample_latents(image=...)` builds from an image of that size,
so training sees the condition sampling will give. The encoder and the VAE run where the clip's own latents do (the
encode actor's GPU, or the identity path's task).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.data.prepare.options import ImageConditioning

ENCODER_BATCH_IMAGES = 64
"""Images per image-encoder call (CLIP ViT-H at 224 px: ~1.5 GB of activations in fp32 at 64)."""


class ImageConditioner:
    """pixels (B, F, H, W, 3) uint8 -> {"image_condition": (B, N, Pc) float32, "image_features": (B, Li, Di) fp16}."""

    def __init__(
        self,
        cfg: ImageConditioning,
        autoencoder: Any,
        device: Any,
        patch: tuple[int, int, int],
        rows_per_call: Callable[[tuple[int, ...]], int],
    ):
        from sora_model.image_encoder import ImageEncoder

        self.cfg, self.autoencoder, self.device, self.patch = cfg, autoencoder, device, patch
        self.rows_per_call = rows_per_call
        self.encoder = None if cfg.encoder is None else ImageEncoder(cfg.encoder, device)

    def images(self, pixels: np.ndarray) -> list[list[Any]]:
        """Each clip's conditioning frames as PIL images: the first, and the last for FLF2V."""
        from PIL import Image

        last = self.cfg.images == 2
        return [[Image.fromarray(clip[0])] + ([Image.fromarray(clip[-1])] if last else []) for clip in pixels]

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        from sora_model.i2v_condition import condition_channels
        from sora_model.patch import patchify

        _, frames, height, width, _ = pixels.shape
        clips = self.images(pixels)
        step = max(1, self.rows_per_call(pixels.shape))
        parts = []
        with torch.no_grad():
            for i in range(0, len(clips), step):
                channels = condition_channels(self.autoencoder, clips[i : i + step], frames, height, width, self.device)
                parts.append(patchify(channels, self.patch).cpu().numpy())  # (b, N, Pc)
        out = {"image_condition": np.concatenate(parts).astype(np.float32, copy=False)}
        if self.encoder is not None:
            per = max(1, ENCODER_BATCH_IMAGES // self.cfg.images)
            feats = []
            for i in range(0, len(clips), per):
                images = [im for clip in clips[i : i + per] for im in clip]  # clip after clip
                feats.append(self.encoder.encode(images, per_clip=self.cfg.images).cpu().numpy())
            out["image_features"] = np.concatenate(feats).astype(np.float16)  # (B, images * Ti, Di)
        return out
