"""`sora convert`: a pretrained model in another library's format -> our export, offline.

    sora convert --from-diffusers Wan2.1-T2V-1.3B-Diffusers --out exports/wan-1.3b
    sora generate --model exports/wan-1.3b --prompt "a cat surfing a wave" --out cat.mp4
    python -m pipelines.convert --from-diffusers DIR --out EXPORT_DIR
    ray job submit --working-dir . -- python -m pipelines.convert --from-diffusers /shared/wan --out /shared/exports/wan

`--from-diffusers` takes a `diffusers` WanPipeline folder (Wan2.1 text-to-video, as `save_pretrained` or the Hub's
`Wan-AI/Wan2.1-T2V-*-Diffusers` hold it; Wan2.2 A14B with its two experts, the second into `model_2.safetensors`)
or a WanImageToVideoPipeline folder (Wan2.1 I2V-14B-480P/720P, FLF2V-14B-720P: its CLIP image encoder and image
processor are copied into the export; then `sora generate --image first.png [--last-image last.png]`).
The transformer's weights are rewritten into `model.safetensors`; the
export's config points at the folder's umT5 text encoder, tokenizer and Wan VAE by absolute path, so keep the
folder where it is (or on storage every node sees). Conversion is in `sora_model/convert_wan.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def run(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError
    from sora_model.convert_wan import convert_wan_folder, pipeline_config_from_wan
    from sora_model.export_io import CONFIG_FILE

    if not os.path.isdir(args.from_diffusers):
        raise UserError(
            f"--from-diffusers '{args.from_diffusers}' is not a folder; "
            "give a diffusers WanPipeline or WanImageToVideoPipeline folder"
        )
    if os.path.isfile(os.path.join(args.out, CONFIG_FILE)) and not args.overwrite:
        raise UserError(f"--out '{args.out}' already holds an export; pass --overwrite to replace it")
    t0 = time.perf_counter()
    pipeline_config_from_wan(args.from_diffusers)  # a folder we cannot convert fails here, before any weights are read
    print(f"sora convert: converting the transformer weights of {args.from_diffusers}", file=sys.stderr, flush=True)
    config = convert_wan_folder(args.from_diffusers, args.out)
    m, d = config.model, config.diffusion
    kind = {0: "", 1: "image-to-video ", 2: "first-last-frame "}[m.image_count]
    if m.image_count == 0 and m.in_channels != m.predicted_channels:
        kind = "image-to-video "
    experts = "" if config.boundary_ratio is None else f" x 2 experts (boundary {config.boundary_ratio:g})"
    solver = ""
    if d.sampler in ("unipc", "dpmpp"):  # the multistep schedulers' settings that change the result
        variant = d.multistep.unipc_variant if d.sampler == "unipc" else d.multistep.dpm_solver_type
        solver = f" (order {d.multistep.order}, {variant}, final sigma {d.multistep.final_sigma})"
    print(
        f"wrote {args.out}: Wan {kind}DiT width {m.hidden_size}, {m.depth} layers, {m.num_heads} heads{experts}; "
        f"{d.num_sampling_steps} {d.sampler} steps{solver}, shift {d.shift:g}, "
        f"guidance {d.guidance_scale:g} ({time.perf_counter() - t0:.1f}s)"
    )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a pretrained model (a diffusers Wan pipeline folder: T2V, I2V, FLF2V, Wan2.2 experts) "
        "into an export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from-diffusers",
        required=True,
        metavar="DIR",
        help="a diffusers WanPipeline or WanImageToVideoPipeline folder",
    )
    p.add_argument("--out", required=True, metavar="EXPORT_DIR", help="export folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.set_defaults(func=run)


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
