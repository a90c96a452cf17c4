r"""Prepare with a model's own parts: `--from-export EXPORT_DIR` takes the text encoder, autoencoder and patch
from an export's config.json, so the data fits that model exactly (a converted Wan2.1: umT5 tokens, 512 per
caption, zero-padded; Wan VAE latents normalised with its latents_mean/std; patch 1x2x2).

    sora convert --from-diffusers Wan2.1-T2V-1.3B-Diffusers --out exports/wan-1.3b
    sora data prepare --manifest clips.jsonl --out data/wan --buckets 33x480x832 --fps 16 --from-export exports/wan-1.3b

Models that contrast guidance with the empty prompt (`null_text: empty_prompt`) also get OUT/null_prompt.safetensors,
the embedding of "" that replaces dropped captions in training (`pipelines.data.null_prompt`).

With `--image-conditioning` (an image-to-video export: I2V, FLF2V) each clip also gets what the model reads beside
its noisy latents: the mask and VAE latents of its first (and last) frame's conditioning video, and the export's
image encoder's features of those frames (`options.IMAGE_CONDITION_COLUMNS`).

    sora data prepare --manifest clips.jsonl --out data/wan-i2v --buckets 33x480x832 --fps 16 \
        --from-export exports/wan-i2v-14b --image-conditioning
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from pipelines.data.prepare.options import DEFAULT_PATCH, ImageConditioning, PrepareError, PrepareOptions
from sora_model.config import ImageEncoderConfig

EXPORT_DECIDES = {
    "text_encoder": ("--text-encoder", "minilm"),
    "max_text_length": ("--max-text-length", None),
    "text_hidden_layer": ("--text-hidden-layer", -1),
    "autoencoder_path": ("--autoencoder-path", None),
    "patch": ("--patch", "x".join(map(str, DEFAULT_PATCH))),
}
"""argparse dest -> (flag, default): what --from-export sets, so giving one of these too is a contradiction."""


def apply_export(options: PrepareOptions, export_dir: str, args: Any = None) -> PrepareOptions:
    """`options` with the export's text encoder, autoencoder and patch (and its null prompt when it needs one)."""
    from sora_model.pipeline import load_export_config

    if args is not None:
        given = [flag for dest, (flag, default) in EXPORT_DECIDES.items() if getattr(args, dest, default) != default]
        if given:
            raise PrepareError(
                f"--from-export sets the text encoder, autoencoder and patch; leave out {', '.join(given)}"
            )
    try:
        config = load_export_config(export_dir)
    except (OSError, ValueError) as err:
        raise PrepareError(f"--from-export: {' '.join(str(err).split())}") from None
    image = None
    if getattr(args, "image_conditioning", False):
        image = image_conditioning(config, export_dir)
    return replace(
        options,
        text_encoder=config.text_encoder,
        autoencoder=config.autoencoder,
        patch=tuple(config.model.patch_size),
        null_prompt=config.model.null_text == "empty_prompt",
        image_conditioning=image,
    )


def image_conditioning(config: Any, export_dir: str) -> ImageConditioning:
    """`--image-conditioning`'s settings from an image-to-video export: how many frames condition a clip, and its image
    encoder with the paths made absolute (`sora convert` copies it into the export and records relative paths)."""
    import os

    m = config.model
    if m.in_channels == m.predicted_channels:
        raise PrepareError(
            f"--image-conditioning: '{export_dir}' is a text-to-video export (model.in_channels equals "
            "the channels it predicts); give an image-to-video one (sora convert of a "
            "WanImageToVideoPipeline)"
        )
    encoder = None
    if m.image_dim is not None:
        paths = {
            k: (v if not v or os.path.isabs(v) else os.path.join(os.path.abspath(export_dir), v))
            for k, v in dataclasses.asdict(config.image_encoder).items()
        }
        encoder = ImageEncoderConfig(**paths)
    return ImageConditioning(images=2 if m.image_positions else 1, encoder=encoder)
