"""What image-to-video sampling conditions on (Wan2.1 I2V and FLF2V, Wan2.2 I2V): the input image(s) as it is given,
its CLIP features, and the latents of a clip that holds it as the first (and last) frame.

Each step, the model reads its noisy latents with a mask and the conditioning latents beside them on the channel
axis (16 + 4 + 16 = 36 channels for Wan), and the CLIP features as extra cross-attention tokens. Everything here
follows diffusers' `WanImageToVideoPipeline` (0.42) step by step, with its own processors: the frame is resized to
the output size by diffusers' `VideoProcessor` (no crop, Lanczos), the CLIP input by the export's
`CLIPImageProcessor` (resize, centre crop), and the features are the encoder's penultimate hidden states.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .config import ImageEncoderConfig

ImageInput = Union["PIL.Image.Image", np.ndarray, str, os.PathLike]  # noqa: F821
"""A PIL image, an (H, W, 3) or (H, W) array (uint8, or float in [0, 1]), or the path of an image file."""


class ImageInputError(ValueError):
    """An image that cannot be used; one line naming it (the file, or the array's shape and dtype)."""


def load_image(image: ImageInput, what: str = "image"):  # -> PIL.Image.Image
    """An RGB PIL image from a path, an array or a PIL image; ImageInputError (one line) for anything else. A file's or
    a PIL image's EXIF orientation is applied (a phone's portrait photo is stored landscape with a rotate tag), as
    diffusers' `load_image` and the server's `open_image` do."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"{what} '{path}' is not a file")
        try:
            with Image.open(path) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened).convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ImageInputError(f"{what} '{path}' cannot be read as an image: {str(err).splitlines()[0]}") from None
    if isinstance(image, np.ndarray):
        if (
            image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
            or min(image.shape[:2]) < 1
        ):
            raise ImageInputError(f"{what} array has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
        if image.dtype != np.uint8:
            if (
                not np.issubdtype(image.dtype, np.floating)
                or not np.isfinite(image).all()
                or image.min() < 0
                or image.max() > 1
            ):
                raise ImageInputError(
                    f"{what} array of dtype {image.dtype} must be uint8, or float with values in [0, 1]"
                )
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    raise ImageInputError(f"{what} must be a PIL image, an array or a path, got {type(image).__name__}")


class ImageEncoder:
    """The export's CLIP vision model and image processor: images -> (1, images * tokens, image_dim) features."""

    def __init__(self, cfg: ImageEncoderConfig, device: str | torch.device = "cpu"):
        import transformers

        for name in (cfg.path, cfg.processor_path or cfg.path):
            if not name or not Path(name).is_dir():
                raise FileNotFoundError(f"image encoder folder '{name}' not found: give a local CLIPVisionModel folder")
        self.model = (
            transformers.CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True).eval().requires_grad_(False)
        )
        self.model.to(device)
        self.processor = transformers.CLIPImageProcessor.from_pretrained(
            cfg.processor_path or cfg.path, local_files_only=True
        )
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: list, per_clip: int | None = None) -> torch.Tensor:
        """(clips, per_clip * Ti, Di) penultimate features; `images` clip after clip, `per_clip` each (None: all one
        clip's). Within a clip the first image's tokens come first."""
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-2]  # (images, Ti, Di)
        per_clip = per_clip or len(images)
        return hidden.float().reshape(len(images) // per_clip, -1, hidden.shape[-1])  # (clips, per_clip * Ti, Di)


@dataclass
class ImageCondition:
    """What the model reads beside the noisy latents: channels (1, mask + latent channels, T', H', W') and image
    features (1, images * Ti, Di), None for a model without an image encoder (Wan2.2 I2V)."""

    channels: torch.Tensor
    features: torch.Tensor | None


def condition_video(images: list, num_frames: int, height: int, width: int, spatial_factor: int) -> torch.Tensor:
    """(1, 3, F, H, W) in [-1, 1]: the first image as frame 0, the last (if given) as frame F - 1, zeros between."""
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=spatial_factor)
    frames = [processor.preprocess(image, height=height, width=width).float() for image in images]  # (1, 3, H, W) each
    video = frames[0].new_zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = frames[0][0]
    if len(frames) == 2:
        video[:, :, -1] = frames[1][0]
    return video  # (1, 3, F, H, W)


def condition_mask(
    num_frames: int, latent_shape: tuple[int, int, int], temporal_factor: int, last: bool
) -> torch.Tensor:
    """(1, temporal_factor, T', H', W'): 1 over the frames given (the first, and the last for FLF2V), 0 elsewhere, one
    channel per frame a latent frame covers (the first latent frame stands for the first frame alone, so it repeats)."""
    lt, lh, lw = latent_shape
    mask = torch.ones(1, 1, num_frames, lh, lw)
    mask[:, :, 1 : num_frames - 1 if last else num_frames] = 0
    first = mask[:, :, :1].repeat_interleave(temporal_factor, dim=2)  # (1, 1, tf, H', W')
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)  # (1, 1, F + tf - 1, H', W')
    return mask.view(1, lt, temporal_factor, lh, lw).transpose(1, 2)  # (1, tf, T', H', W')


__all__ = [
    "ImageCondition",
    "ImageEncoder",
    "ImageInput",
    "ImageInputError",
    "condition_mask",
    "condition_video",
    "load_image",
]
