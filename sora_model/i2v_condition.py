"""Image-to-video's condition, built one way for sampling and for training (Wan2.1 I2V and FLF2V, Wan2.2 I2V).

    cond = image_condition([first], frames, height, width, autoencoder, image_encoder, device)  # sampling: one clip
    channels = condition_channels(autoencoder, [[first_0], [first_1]], frames, height, width, device)  # prepare

The model reads, beside its noisy latents, a mask and the latents of a clip that holds the conditioning frame(s)
(`condition_video`: the first frame, zeros, and for FLF2V the last frame, through the VAE as a whole clip: Wan's
causal VAE gives other latents for that clip than for the first frame alone), and the image encoder's features
(`ImageEncoder`). `sora data prepare --image-conditioning` stores exactly these per clip, from the clip's own first
(and last) frame, so a model trained on them sees at training time what `TextToVideoPipeline.sample_latents(image=)`
gives it at sampling time.
"""

from __future__ import annotations

import torch

from .image_encoder import ImageCondition, ImageEncoder, condition_mask, condition_video


def condition_channels(
    autoencoder, clips: list[list], num_frames: int, height: int, width: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(B, temporal_factor + C, T', H', W'): the mask, then the latents of each clip's conditioning video (Wan's order).

    clips: per clip its conditioning images (PIL), the first frame and, for FLF2V, the last; all clips alike."""
    counts = {len(images) for images in clips}
    if len(counts) != 1 or not counts <= {1, 2}:
        raise ValueError(f"every clip needs the same 1 or 2 conditioning images, got {sorted(counts)}")
    sf = autoencoder.spatial_factor
    videos = torch.cat([condition_video(images, num_frames, height, width, sf) for images in clips])  # (B, 3, F, H, W)
    latents = autoencoder.encode(videos.to(device)).float()  # (B, C, T', H', W')
    last = counts == {2}
    mask = condition_mask(num_frames, tuple(latents.shape[2:]), autoencoder.temporal_factor, last).to(latents.device)
    return torch.cat([mask.expand(latents.shape[0], -1, -1, -1, -1), latents], dim=1)  # (B, tf + C, T', H', W')


def image_condition(
    images: list,
    num_frames: int,
    height: int,
    width: int,
    autoencoder,
    image_encoder: ImageEncoder | None,
    device: str | torch.device,
) -> ImageCondition:
    """One clip's condition from its conditioning images (PIL: the first frame, and the last for FLF2V): channels
    (1, tf + C, T', H', W') and features (1, images * Ti, Di), None without an image encoder (Wan2.2 I2V)."""
    channels = condition_channels(autoencoder, [images], num_frames, height, width, device)
    features = None if image_encoder is None else image_encoder.encode(images).to(device)  # (1, Li, Di)
    return ImageCondition(channels, features)


__all__ = ["condition_channels", "image_condition"]
