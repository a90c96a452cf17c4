"""What the recipe asks of the training model beyond ZeRO-3: sequence parallelism and `torch.compile`.

Applied from outside to the DeepSpeed engine around an unchanged DiT (STYLE 12), and called by
`worker.py` at four points:

    par = parallelize(engine, recipe, world)     # groups, Ulysses hooks, compile
    batch = par.share(batch)                     # a sequence-parallel group trains on one micro-batch
    pred = par.forward(engine, x_t, t, ...)      # the full prediction on every rank of the group
    engine.backward(loss * par.loss_scale)       # each rank's gradient is its piece's share

With `sequence_parallel_size` 1 all four are the plain data-parallel behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipelines.train.recipe import Recipe
from pipelines.train.sequence_parallel import broadcast_batch, install_ulysses, new_groups, sequence_parallel_forward

RECOMPILE_LIMIT = 64
"""Compiled graphs kept per function: one per bucket (and per train/eval mode), well above any curriculum's
buckets, so a long run never falls back to eager after torch's default of 8 (dynamic=False compiles once per shape)."""


@dataclass
class Parallel:
    sp: int
    """Sequence-parallel group size (1 = plain data parallelism)."""
    group: Any
    """This rank's sequence-parallel process group (None when sp is 1)."""
    src: int
    """Global rank of the group's first rank, whose micro-batch the group trains on."""
    dp_rank: int
    """Index of this rank's group among the data-parallel replicas: seeds the step's noise, so a group agrees."""
    patch_size: tuple[int, int, int]
    in_channels: int

    @property
    def loss_scale(self) -> float:
        """DeepSpeed averages gradients over all ranks; a group's ranks hold shares that must sum, not average."""
        return float(self.sp)

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch if self.sp == 1 else broadcast_batch(batch, self.group, self.src)

    def forward(self, engine: Any, x_t, t, tokens, mask, pooled, drop) -> torch.Tensor:
        if self.sp == 1:
            return engine(x_t, t, tokens, mask, pooled, drop_text=drop)
        return sequence_parallel_forward(engine, x_t, t, tokens, mask, pooled, drop, self.group, self.patch_size, self.in_channels)


def parallelize(engine: Any, recipe: Recipe, world: int) -> Parallel:
    """Set up the recipe's sequence parallelism and compilation on a DeepSpeed engine (every rank calls it)."""
    sp = recipe.sequence_parallel_size
    cfg = recipe.model_config()
    rank = dist.get_rank()
    group, src, dp_rank = (None, rank, rank) if sp == 1 else new_groups(world, sp)
    if sp > 1:
        install_ulysses(engine.module, group)
    if recipe.compile:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        engine.compile(compile_kwargs={"dynamic": False})
    return Parallel(sp=sp, group=group, src=src, dp_rank=dp_rank, patch_size=cfg.patch_size, in_channels=cfg.in_channels)
