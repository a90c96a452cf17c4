"""`sora data prepare`'s command-line arguments -> PrepareOptions, with an export's settings applied
(`--from-export`, from_export.py): the one place the argparse namespace is read."""

from __future__ import annotations

from typing import Any

from pipelines.data.prepare.from_export import apply_export
from pipelines.data.prepare.options import (
    Bucket,
    PrepareError,
    PrepareOptions,
    encoder_max_length,
    parse_buckets,
    parse_patch,
)
from sora_model.config import AutoencoderConfig, TextEncoderConfig


def _default_max_length(args: Any) -> int:
    """--max-text-length when not given: the encoder's maximum; with --from-export the export's setting replaces it,
    and a folder that is not there is reported by the text encoder check, not here."""
    from pathlib import Path

    from sora_model.text import MINILM_NAME

    if getattr(args, "from_export", None) or (
        args.text_encoder != MINILM_NAME and not Path(args.text_encoder).is_dir()
    ):
        return TextEncoderConfig().max_length
    return encoder_max_length(args.text_encoder)


def options_from_args(args: Any) -> PrepareOptions:
    """argparse namespace (see commands.add_prepare_arguments) -> PrepareOptions."""
    if args.buckets:
        if args.resolution is not None or args.frames is not None:
            raise PrepareError("give either --resolution and --frames, or --buckets, not both")
        buckets = parse_buckets(args.buckets)
    else:
        if args.resolution is None or args.frames is None:
            raise PrepareError("--resolution and --frames are required (or --buckets FxHxW,...)")
        buckets = [Bucket.parse(f"{args.frames}x{args.resolution}x{args.resolution}")]
    autoencoder = (
        AutoencoderConfig(kind="diffusers", path=args.autoencoder_path)
        if args.autoencoder_path
        else AutoencoderConfig()
    )
    options = PrepareOptions(
        manifest=args.manifest,
        out=args.out,
        buckets=buckets,
        fps=args.fps,
        clips_per_video=args.clips_per_video,
        stride_s=args.stride,
        patch=parse_patch(args.patch),
        text_encoder=TextEncoderConfig(
            name_or_path=args.text_encoder,
            hidden_layer=args.text_hidden_layer,
            max_length=args.max_text_length if args.max_text_length is not None else _default_max_length(args),
        ),
        autoencoder=autoencoder,
        rows_per_file=args.rows_per_file,
        overwrite=args.overwrite,
        workers=args.workers,
        decode_batch_mib=getattr(args, "decode_batch_mib", None),
        vae_batch_clips=getattr(args, "vae_batch_clips", None),
        progress=not args.no_progress,
        decode_timeout_s=args.decode_timeout,
        caption_actors=args.caption_actors,
        max_upscale=args.max_upscale,
        max_fps_ratio=args.max_fps_ratio,
        scratch=args.scratch,
        curate=getattr(args, "curate", False),
    )
    if getattr(args, "from_export", None):
        return apply_export(options, args.from_export, args)
    if getattr(args, "image_conditioning", False):
        raise PrepareError(
            "--image-conditioning needs --from-export EXPORT_DIR: the image-to-video export whose VAE "
            "and image encoder make each clip's condition"
        )
    return options
