"""Prepare with a model's own parts: `--from-export EXPORT_DIR` takes the text encoder, autoencoder and patch
from an export's config.json, so the data fits that model exactly (a converted Wan2.1: umT5 tokens, 512 per
caption, zero-padded; Wan VAE latents normalised with its latents_mean/std; patch 1x2x2).

    sora convert --from-diffusers Wan2.1-T2V-1.3B-Diffusers --out exports/wan-1.3b
    sora data prepare --manifest clips.jsonl --out data/wan --buckets 33x480x832 --fps 16 --from-export exports/wan-1.3b

Models that contrast guidance with the empty prompt (`null_text: empty_prompt`) also get OUT/null_prompt.safetensors,
the embedding of "" that replaces dropped captions in training (`pipelines.data.null_prompt`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipelines.data.prepare.options import DEFAULT_PATCH, PrepareError, PrepareOptions

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
            raise PrepareError(f"--from-export sets the text encoder, autoencoder and patch; leave out {', '.join(given)}")
    try:
        config = load_export_config(export_dir)
    except (OSError, ValueError) as err:
        raise PrepareError(f"--from-export: {' '.join(str(err).split())}") from None
    return replace(
        options,
        text_encoder=config.text_encoder,
        autoencoder=config.autoencoder,
        patch=tuple(config.model.patch_size),
        null_prompt=config.model.null_text == "empty_prompt",
    )
