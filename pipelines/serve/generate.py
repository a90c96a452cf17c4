"""`sora generate`: sample one clip locally with the same `TextToVideoPipeline` the Serve replicas use.

    sora generate --model runs/demo/export --prompt "a red circle moving left" --out clip.mp4
    sora generate --model runs/demo/export --prompt "..." --steps 8 --seed 3 --precision int8 --out clip.npz
    sora generate --model exports/wan-1.3b --lora adapters/my-style --prompt "..." --out clip.mp4
    sora generate --model runs/demo/export --prompt "..." --step-cache teacache --cache-threshold 0.15 --out clip.mp4
    sora generate --model exports/wan-i2v --prompt "..." --image first.png [--last-image last.png] --out clip.mp4
    python -m pipelines.serve.generate --model ... --prompt ... --out clip.gif
    ray job submit --working-dir . -- python -m pipelines.serve.generate --model ... --prompt ... --out clip.mp4

Every unset option takes the export's `config.json` default (what the model was trained and tuned for).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

OUTPUT_EXTENSIONS = (".mp4", ".gif", ".npz")
MAX_SEED = 2**63 - 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export folder (model.safetensors + config.json)")
    p.add_argument("--prompt", required=True, help="what the clip shows")
    p.add_argument(
        "--out", required=True, help="output file: .mp4 (H.264), .gif, or .npz (key 'frames', uint8 (T, H, W, 3))"
    )
    p.add_argument("--frames", type=int, help="frames (default: the export's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the export's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the export's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the export's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = off (default: the export's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same clip (default 0)")
    from sora_model.diffusion.registry import sampler_help  # pure Python: no torch at argument parsing

    p.add_argument("--sampler", help=f"{sampler_help()} (default: the export's)")
    p.add_argument(
        "--step-cache",
        help="skip the transformer on steps whose input barely moved: teacache or fbcache (default none: exact)",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        help="change a step cache tolerates, >= 0; 0 never skips (default: teacache 0.15, fbcache 0.2)",
    )
    p.add_argument("--negative-prompt", help="what to steer away from (replaces the learned null condition)")
    p.add_argument(
        "--image",
        metavar="PATH",
        help="image-to-video exports: the clip's first frame (any size; resized as diffusers does)",
    )
    p.add_argument(
        "--last-image", metavar="PATH", help="first-last-frame (FLF2V) exports: the clip's last frame, with --image"
    )
    p.add_argument("--fps", type=float, help="frame rate of .mp4/.gif output (default: the export's)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="int8: dynamic quantisation (CPU); bf16: autocast (GPU)",
    )
    p.add_argument("--lora", help="a peft LoRA adapter folder to merge into the model's weights at load")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the clip's tokens over N local processes (GPUs on cuda), Ulysses; N divides the heads (default 1)",
    )
    p.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="guidance's two branches on two groups of --sequence-parallel processes",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: fail in milliseconds, before torch loads."""
    from pipelines.cli import UserError

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise UserError(f"--out must end in {', '.join(OUTPUT_EXTENSIONS)}, got '{args.out}'")
    if not os.path.isdir(args.model):
        raise UserError(
            f"--model '{args.model}' is not a folder; give an export folder (model.safetensors + config.json)"
        )
    if not args.prompt.strip():
        raise UserError("--prompt must not be empty")
    for name in ("frames", "height", "width", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps must be > 0, got {args.fps}")
    if args.lora is not None and not os.path.isdir(args.lora):
        raise UserError(f"--lora '{args.lora}' is not a folder; give a peft LoRA adapter folder (adapter_config.json)")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if args.last_image is not None and args.image is None:
        raise UserError("--last-image needs --image (the first frame)")
    for flag, path in (("--image", args.image), ("--last-image", args.last_image)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} '{path}' is not a file; give an image file (PNG, JPEG, ...)")


def generate(args: argparse.Namespace) -> str:
    """Load, check against the model, sample with a progress bar, write. Returns the output path."""
    import torch
    from tqdm import tqdm

    from pipelines.cli import UserError
    from sora_model.pipeline import TextToVideoPipeline
    from sora_model.step_cache import StepCacheStats
    from sora_model.video import write_video

    from .params import cli_sampling, model_card

    check_arguments(args)
    if args.sequence_parallel != 1 or args.cfg_parallel:
        from pipelines.parallel.launch import generate_parallel  # N (x2) local processes, rank 0 writes

        return generate_parallel(args)
    step_cache, cache_threshold = _step_cache_arguments(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = TextToVideoPipeline.load(args.model, device=device, precision=args.precision, lora=args.lora)
    card = model_card(pipe)
    frames, height, width, steps, sampler = cli_sampling(args, card)
    problem = pipe.image_problem(args.image is not None, args.last_image is not None)
    if problem:
        raise UserError(problem.replace("last_image", "--last-image").replace("as image", "as --image"))
    bar: Any = tqdm(total=steps, desc="sampling", unit="step", disable=args.no_progress, file=sys.stderr)
    stats: list[StepCacheStats] = []
    try:
        clip = pipe(
            args.prompt,
            num_frames=frames,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            sampler=sampler,
            negative_prompt=args.negative_prompt,
            callback=lambda step, total: bar.update(1),
            step_cache=step_cache,
            cache_threshold=cache_threshold,
            cache_stats=stats.append,
            image=args.image,
            last_image=args.last_image,
        )[0]  # (T, H, W, 3) uint8
    finally:
        bar.close()
    out = write_video(args.out, clip, fps=args.fps or card.fps)
    print(
        f"wrote {out}: {clip.shape[0]} frames at {clip.shape[2]}x{clip.shape[1]}, seed {args.seed}, {steps} "
        f"{sampler} steps"
    )
    for s in stats:
        print(s.summary())
    return out


def _step_cache_arguments(args: argparse.Namespace) -> tuple[str | None, float | None]:
    """(--step-cache, --cache-threshold) checked by the pipeline's own rule, as one-line UserErrors."""
    from pipelines.cli import UserError
    from sora_model.step_cache import check_step_cache

    try:
        return check_step_cache(args.step_cache, args.cache_threshold)
    except ValueError as err:
        raise UserError(
            str(err).replace("step_cache", "--step-cache").replace("cache_threshold", "--cache-threshold")
        ) from None


def run(args: argparse.Namespace) -> int:
    generate(args)
    return 0


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
