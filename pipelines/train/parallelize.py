"""What the recipe asks of the training model beyond ZeRO-3: sequence parallelism, selective activation
checkpointing and `torch.compile`.

Applied from outside to the DeepSpeed engine around an unchanged DiT (STYLE 12), and called by
`worker.py` at four points:

    par = parallelize(engine, recipe, world, device)   # groups, Ulysses hooks, selective checkpointing, compile
    batch = par.share(batch)                     # a sequence-parallel group trains on one micro-batch
    pred = par.forward(engine, x_t, t, ...)      # the full prediction on every rank of the group
    engine.backward(loss * par.loss_scale)       # each rank's gradient is its piece's share

With `sequence_parallel_size` 1 all four are the plain data-parallel behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

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
    """Channels of the prediction the group gathers (the model's predicted channels: 16 of an I2V model's 36 inputs)."""

    @property
    def loss_scale(self) -> float:
        """DeepSpeed averages gradients over all ranks; a group's ranks hold shares that must sum, not average."""
        return float(self.sp)

    device: torch.device = torch.device("cpu")
    """Where this rank trains: a received micro-batch lands there."""

    def share(self, batch: dict[str, Any] | None) -> dict[str, Any]:
        """The group reader's micro-batch on every rank of the group (`batch` is None on the others)."""
        return batch if self.sp == 1 else broadcast_batch(batch, self.group, self.src, self.device)

    def forward(self, engine: Any, x_t, t, tokens, mask, pooled, drop, image_features=None) -> torch.Tensor:
        if self.sp == 1:
            return engine(x_t, t, tokens, mask, pooled, drop_text=drop, image_features=image_features)
        return sequence_parallel_forward(
            engine,
            x_t,
            t,
            tokens,
            mask,
            pooled,
            drop,
            self.group,
            self.patch_size,
            self.in_channels,
            image_features=image_features,
        )


def selected_blocks(depth: int, fraction: float) -> list[int]:
    """The blocks that checkpoint: `fraction` of `depth`, spread evenly (0.5: every other block, 1/3: every third,
    as torchtitan's selective per-layer checkpointing with ac_freq = 1 / fraction)."""
    return [i for i in range(depth) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)]


def checkpoint_blocks(blocks: torch.nn.ModuleList, fraction: float) -> list[int]:
    """Recompute the selected blocks' activations in the backward instead of keeping them; returns their indices.

    Each selected block's class becomes a subclass whose call runs under `torch.utils.checkpoint` (non-reentrant).
    The recompute goes through the block's own `__call__`, so ZeRO-3's hooks gather its parameters again, and
    nothing is renamed: parameter names, checkpoints and exports are those of the unwrapped model.
    """
    chosen = selected_blocks(len(blocks), fraction)
    for i in chosen:
        block = blocks[i]
        base = type(block)
        if base.__call__ is _checkpointed_call:
            continue  # already selected (parallelize called twice on one model)
        block.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": _checkpointed_call})
    return chosen


def _checkpointed_call(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    plain = super(type(self), self).__call__  # the block class's own nn.Module.__call__: hooks, then forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def parallelize(engine: Any, recipe: Recipe, world: int, device: torch.device | None = None) -> Parallel:
    """Set up the recipe's sequence parallelism, selective checkpointing and compilation on a DeepSpeed engine
    (every rank calls it)."""
    sp = recipe.sequence_parallel_size
    cfg = recipe.model_config()
    rank = dist.get_rank()
    group, src, dp_rank = (None, rank, rank) if sp == 1 else new_groups(world, sp)
    if sp > 1:
        install_ulysses(engine.module, group)
    if recipe.checkpoint_fraction > 0 and not cfg.gradient_checkpointing:  # that one already checkpoints every block
        checkpoint_blocks(engine.module.blocks, recipe.checkpoint_fraction)
    if recipe.compile:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        engine.compile(compile_kwargs={"dynamic": False})
    return Parallel(
        sp=sp,
        group=group,
        src=src,
        dp_rank=dp_rank,
        patch_size=cfg.patch_size,
        in_channels=cfg.predicted_channels,
        device=device or torch.device("cpu"),
    )
