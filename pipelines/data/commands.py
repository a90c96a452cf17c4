r"""`sora data ...` sub-commands; the same parsers serve `python -m pipelines.data.synth|prepare|filter`.

sora data synth --out data/shapes --num-videos 168
sora data prepare --manifest data/shapes/captions.jsonl --out data/prepared --resolution 32 --frames 8 --fps 8
sora data prepare --manifest clips.jsonl --out data/curated --resolution 256 --frames 33 --curate
sora data filter --in data/curated --out data/moving --min-motion 0.5 --drop-duplicates
sora data prepare --manifest clips.jsonl --out data/wan --buckets 33x480x832 --fps 16 --from-export exports/wan-1.3b
sora data prepare --manifest clips.jsonl --out data/i2v --buckets 81x480x832 --fps 16 \
    --from-export exports/wan-i2v-14b --image-conditioning
ray job submit --working-dir . -- python -m pipelines.data.prepare --manifest ... --out ... --resolution 32 --frames 8
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines import console
from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S
from pipelines.data.prepare.options import DEFAULT_MAX_FPS_RATIO, DEFAULT_MAX_UPSCALE, DEFAULT_PATCH


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: videos/*.mp4 and captions.jsonl")
    p.add_argument("--num-videos", type=int, required=True, help="videos to render (84 combinations are cycled)")
    p.add_argument("--size", type=int, default=32, help="frame width and height in pixels, even (default 32)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--fps", type=float, default=8, help="frame rate written into the MP4 (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the start positions (default 0)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar='"COLOR SHAPE DIRECTION"',
        help='leave out matching combinations, e.g. "red circle left" or "* triangle *"; repeatable',
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    _add_clip_arguments(p)
    _add_model_arguments(p)
    _add_run_arguments(p)
    p.add_argument(
        "--curate",
        action="store_true",
        help="clips never span a scene cut, and each gets scene, motion and phash columns for `sora data filter`",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    console.add_arguments(p)


def _add_clip_arguments(p: argparse.ArgumentParser) -> None:
    """What goes in and what comes out: the manifest, the output folder, the clips' shape and rate, and the
    guards that reject inputs which would be upscaled or whose frames would repeat."""
    p.add_argument(
        "--manifest",
        required=True,
        help="JSONL or CSV (path + caption|text), or a folder of videos with NAME.txt captions",
    )
    p.add_argument(
        "--out", required=True, help="output folder (refused if it holds something else; resumed if interrupted)"
    )
    p.add_argument("--resolution", type=int, help="square clip size in pixels, after short-side resize and centre crop")
    p.add_argument("--frames", type=int, help="frames per clip (1 makes image clips)")
    p.add_argument(
        "--buckets", help="instead of --resolution/--frames: FxHxW,... e.g. 1x32x32,8x32x32; one folder each"
    )
    p.add_argument("--fps", type=float, help="clip frame rate, resampled from the source (default: the source's own)")
    p.add_argument(
        "--clips-per-video", type=int, default=1, help="clips per video, --stride apart; 0 = all that fit (default 1)"
    )
    p.add_argument("--stride", type=float, help="seconds between clip starts (default: one clip length)")
    p.add_argument(
        "--max-upscale",
        type=float,
        default=DEFAULT_MAX_UPSCALE,
        help=(
            "reject inputs that would be scaled up more than this to fill their bucket (default %(default)g: never "
            "upscale)"
        ),
    )
    p.add_argument(
        "--max-fps-ratio",
        type=float,
        default=DEFAULT_MAX_FPS_RATIO,
        help=(
            "reject inputs whose fps is below --fps by more than this factor: frames would repeat (default %(default)g)"
        ),
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How the run is carried out: shard size, scratch space, decode and encode batching, timeouts, actors."""
    p.add_argument("--rows-per-file", type=int, default=256, help="clips per Parquet shard at most (default 256)")
    p.add_argument(
        "--scratch", help="local folder where remote inputs are copied while decoded (default: the temp folder)"
    )
    p.add_argument("--workers", type=int, help="decode tasks at once at most (default: as many as there are CPUs)")
    p.add_argument(
        "--decode-batch-mib",
        type=int,
        help=(
            "decoded pixels per decode task, MiB (default: a quarter of a task's share of the smallest node's "
            "memory, 128 MiB-4 GiB)"
        ),
    )
    p.add_argument(
        "--vae-batch-clips",
        type=int,
        help=(
            "clips per VAE encode call (default: from the GPU's free memory and a per-clip estimate; on CPU 2 GiB "
            "of input)"
        ),
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=DECODE_TIMEOUT_S,
        help=(
            "seconds a probe or a clip's decode may take; longer is a 'decoder timed out' reject (default %(default)g)"
        ),
    )
    p.add_argument(
        "--caption-actors",
        type=int,
        help="text-encoder actors (default: one per GPU; on CPU-only clusters 0 = tasks keeping the encoder loaded)",
    )


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What the clips are encoded for: the model's patch, text encoder and autoencoder (or an export's), images."""
    p.add_argument(
        "--patch",
        default="x".join(map(str, DEFAULT_PATCH)),
        help="the model's patch size TxHxW; must equal the recipe's model.patch_size (default %(default)s, DiT-demo)",
    )
    p.add_argument(
        "--text-encoder", default="minilm", help="'minilm' (packaged, offline) or a local Hugging Face folder"
    )
    p.add_argument(
        "--max-text-length",
        type=int,
        help="text tokens kept per caption; longer captions are cut and counted (default: the encoder's own maximum, "
        "e.g. 512 for T5/umT5, 77 for CLIP; 32 for the packaged minilm, as the demo recipes train)",
    )
    p.add_argument(
        "--text-hidden-layer",
        type=int,
        default=-1,
        help="text encoder hidden state used: -1 last layer (default), 0 token embeddings; must match the recipe's",
    )
    p.add_argument("--autoencoder-path", help="local diffusers VAE folder; latents instead of pixels (default: pixels)")
    p.add_argument(
        "--from-export",
        metavar="EXPORT_DIR",
        help="take the text encoder, autoencoder and patch from an export (e.g. a converted Wan2.1: umT5 + Wan VAE)",
    )
    p.add_argument(
        "--image-conditioning",
        action="store_true",
        help="with --from-export of an image-to-video export: also store each clip's first (FLF2V: and last) frame "
        "condition, its VAE latents and image-encoder features, for I2V fine-tuning",
    )


def run_synth(args: argparse.Namespace) -> int:
    from pipelines.data.synth import synth

    synth(
        args.out,
        args.num_videos,
        size=args.size,
        frames=args.frames,
        fps=args.fps,
        seed=args.seed,
        exclude=args.exclude,
        progress=not args.no_progress,
    )
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from pipelines.data.prepare import options_from_args, prepare

    opts = options_from_args(args)
    console.start_for(args, "sora data prepare")
    info = prepare(opts)
    console.say(
        f"sora data prepare: {info['num_clips']} clips in {len(info['buckets'])} bucket(s), {info['num_rejected']} "
        f"inputs rejected, {info['seconds']:.0f}s → {opts.out}"
    )
    return 0


def register(subparsers: Any) -> None:
    data = subparsers.add_parser(
        "data",
        help="make and prepare video datasets (Ray Data)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    synth = sub.add_parser("synth", help="render the synthetic shapes dataset (MP4 + captions.jsonl)")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)
    prepare = sub.add_parser("prepare", help="videos + captions -> Parquet shards of patches and text embeddings")
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare)
    from pipelines.data.filter import add_filter_arguments, run_filter

    filter_ = sub.add_parser(
        "filter", help="a curated dataset without its static clips and near-duplicates (no decoding)"
    )
    add_filter_arguments(filter_)
    filter_.set_defaults(func=run_filter)
