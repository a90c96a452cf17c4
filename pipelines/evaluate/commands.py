"""`sora eval`: registered into the `sora` CLI (see pipelines/evaluate/run.py for what it measures)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="generate clips for a prompt list and measure them (attributes, consistency, diversity, FID/FVD, CLIP)",
        description=(
            "Generate clips from an export for every prompt and seed, then write metrics.json and print a table."
        ),
    )
    p.add_argument(
        "--model", required=True, metavar="EXPORT_DIR", help="export folder (model.safetensors + config.json)"
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="text (one prompt a line) or JSONL {prompt, attributes?, held_out?}",
    )
    p.add_argument(
        "--out", default="metrics.json", metavar="FILE", help="where to write the metrics (default: metrics.json)"
    )
    p.add_argument(
        "--seeds", type=int, default=2, help="clips per prompt, seeds SEED..SEED+N-1 (default: 2; diversity needs 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the export's)")
    p.add_argument("--height", type=int, default=None, help="clip height (default: the export's)")
    p.add_argument("--width", type=int, default=None, help="clip width (default: the export's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the export's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the export's)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips generated per batch (default: 8)")
    p.add_argument(
        "--features", default=None, metavar="PATH", help="feature network for FID/FVD: TorchScript .pt or .safetensors"
    )
    p.add_argument("--reference", default=None, metavar="DIR", help="folder of real videos to compare with (FID/FVD)")
    p.add_argument("--clip", default=None, metavar="PATH", help="local CLIP checkpoint folder for the CLIP score")
    p.add_argument(
        "--save-samples", default=None, metavar="DIR", help="also write every clip as a GIF (and grid.gif) here"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError
    from pipelines.evaluate.run import evaluate_export, format_table

    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model}: export folder not found")
    result = evaluate_export(
        args.model,
        args.prompts,
        seeds=args.seeds,
        seed=args.seed,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        features=args.features,
        reference=args.reference,
        clip=args.clip,
        save_samples=args.save_samples,
        out=args.out,
        device=args.device,
        progress=not args.quiet,
    )
    print(format_table(result))
    print(f"metrics written to {args.out}")
    return 0
