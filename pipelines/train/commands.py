"""`sora train ...` and `sora export ...`: see `pipelines.train.trainer` for the run folder and the Ray job form.

sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/images,data/clips --run-dir runs/smoke
sora train --recipe cluster/recipes/article-5stage.yaml --rehearse --run-dir /tmp/rehearse
    (pipelines/train/rehearse.py)
ray job submit --working-dir . -- python -m pipelines.train.trainer --recipe ... --data ... --run-dir ...
sora export --checkpoint runs/smoke/ray_results/smoke-cpu/checkpoint_0000008 --out export8 --ema
sora export --checkpoint runs/wan-lora/ray_results/wan-1.3b-lora/checkpoint_0001000 --out wan-merged --merge-lora
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.train.trainer import add_arguments

    p = subparsers.add_parser(
        "train",
        help="train a DiT through a recipe's curriculum (Ray Train + DeepSpeed ZeRO-3)",
        description="Train through a recipe's stages with Ray Train + DeepSpeed; writes RUN/export/ at the end.",
    )
    add_arguments(p)
    for action in p._actions:  # a rehearsal makes its own data, and its own run folder when none is given
        if action.dest in ("data", "run_dir"):
            action.required = False
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run the recipe's own settings (precision, ZeRO, offload, sequence parallelism, packing, LoRA, EMA, "
        "init_from, every stage, one lost worker and its restart) at tiny size on 2 CPU workers, then say in "
        "one line what ran and what cannot be rehearsed on CPU",
    )
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "export",
        help="write an export folder from any training checkpoint (offline: no Ray, no GPU)",
        description="Gather a checkpoint's fp32 master weights (written by any number of ranks) into an export: "
        "model.safetensors + config.json, and ema.safetensors with --ema.",
    )
    e.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder or URI: RUN/ray_results/NAME/checkpoint_NNNNNNN"
    )
    e.add_argument("--out", required=True, help="export folder to write (model.safetensors, config.json)")
    e.add_argument(
        "--ema", action="store_true", help="also write the EMA weights (ema.safetensors, what generation prefers)"
    )
    e.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run's checkpoint: write the base (its init_from) with the adapter merged, a whole export, "
        "instead of the adapter folder",
    )
    e.set_defaults(func=run_export)


def run_train(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError

    if args.rehearse:
        from pipelines.train.rehearse import run as rehearse

        return rehearse(args)
    for flag, value in (("--data", args.data), ("--run-dir", args.run_dir)):
        if not value:
            raise UserError(f"sora train needs {flag} (or --rehearse, which makes its own)")
    from pipelines.train.trainer import run

    return run(args)


def run_export(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError
    from pipelines.train.checkpoint import export_checkpoint
    from pipelines.train.storage import RunStore

    store = RunStore(args.checkpoint)
    if not store.exists():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise UserError(f"--out {args.out} exists and is not empty; choose a new folder")
    tmp = tempfile.mkdtemp(prefix="sora-export-") if store.remote else None
    try:
        local = store.download("", os.path.join(tmp, "ckpt")) if tmp else store.url()
        out = export_checkpoint(local, args.out, ema=args.ema, merge_lora=args.merge_lora)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
