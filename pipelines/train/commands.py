"""`sora train ...`: see `pipelines.train.trainer` for the run folder and the Ray job form.

sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/images,data/clips --run-dir runs/smoke
ray job submit --working-dir . -- python -m pipelines.train.trainer --recipe ... --data ... --run-dir ...
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.train.trainer import add_arguments, run

    p = subparsers.add_parser(
        "train",
        help="train a DiT through a recipe's curriculum (Ray Train + DeepSpeed ZeRO-3)",
        description="Train through a recipe's stages with Ray Train + DeepSpeed; writes RUN/export/ at the end.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
