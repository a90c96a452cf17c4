"""Sampling one clip over several ranks: Ulysses sequence parallelism and CFG parallelism, applied from outside.

The DiT is unchanged (`sora_model` never imports torch.distributed). `ParallelDiT` wraps it: each rank of a
sequence-parallel group embeds its contiguous 1/sp of the clip's tokens, the text, timestep and its own tokens'
RoPE positions (a sharded `TokenLayout` given as `grids`), and the attention hook of
`pipelines/train/sequence_parallel.py` all-to-alls around every self-attention so attention sees the whole clip with
H/sp heads. The prediction is all-gathered, so every rank holds the same latents and runs the same sampler step.

A clip whose token count N does not divide by sp is padded, never refused: the token grid grows along the axis
that needs the fewest extra tokens (so real tokens keep their (t, h, w) positions and RoPE), the padding rows are
zero patches, and around self-attention the hook drops them before attending with the real grid and scope (a
windowed or temporal scope sees exactly the real clip), then writes zeros back in their place. Every other layer
works per token, so the real tokens' predictions are those of the unpadded clip.

CFG parallelism (`ParallelConfig.cfg`): ranks [0, sp) run the conditional branch, [sp, 2 sp) the unconditional
one, and the two ranks with the same sequence index exchange their branch's prediction once per model call (once
per step on a GPU; on CPU per cache-sized call of `TextToVideoPipeline._forward`); every rank then mixes the
guidance in the pipeline's own `guided_model_fn`, so all ranks keep identical latents. Step caches are refused
(each rank would decide on its own tokens). Rank 0 decodes (`ParallelPipeline.__call__`).

    groups = new_sampling_groups(ParallelConfig(sequence=2, cfg=True))   # every rank, after init_process_group
    pipe = ParallelPipeline.load(export_dir, device=device).parallelize(groups)
    frames = pipe(prompt, seed=0)       # (1, T, H, W, 3) uint8 on rank 0, None elsewhere
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipelines.train.sequence_parallel import heads_to_seq, install_ulysses, seq_to_heads
from sora_model.attention import AttentionScope, TokenLayout, scoped_attention
from sora_model.autoencoder import model_to_pixels
from sora_model.dit import DiT
from sora_model.patch import patch_grid, patchify, unpatchify
from sora_model.pipeline import TextToVideoPipeline

from .config import ParallelConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class SamplingGroups:
    """This rank's place in one request's world of `parallel.world_size` ranks (cfg-major: rank = cfg * sp + seq)."""

    parallel: ParallelConfig
    rank: int
    sequence_rank: int
    sequence_group: Any
    """The ranks of this rank's branch (None when sequence = 1)."""
    cfg_rank: int
    """0: the conditional branch, 1: the unconditional one."""
    cfg_group: Any
    """The two ranks with this rank's sequence index, one per branch (None without CFG parallelism)."""


def new_sampling_groups(parallel: ParallelConfig) -> SamplingGroups:
    """Form the groups over the default process group; every rank calls it (new_group is collective)."""
    world, rank, sp = dist.get_world_size(), dist.get_rank(), parallel.sequence
    if world != parallel.world_size:
        raise ValueError(
            f"parallel sampling with sequence={sp}, cfg={parallel.cfg} needs {parallel.world_size} ranks, the world "
            f"has {world}"
        )
    branches = 2 if parallel.cfg else 1
    sequence_group = cfg_group = None
    if sp > 1:
        for b in range(branches):
            group = dist.new_group(list(range(b * sp, (b + 1) * sp)))
            if rank // sp == b:
                sequence_group = group
    if parallel.cfg:
        for s in range(sp):
            group = dist.new_group([s, sp + s])
            if rank % sp == s:
                cfg_group = group
    return SamplingGroups(parallel, rank, rank % sp, sequence_group, rank // sp, cfg_group)


@dataclass(frozen=True)
class ShardPlan:
    """How a clip's token grid is split over `size` ranks: padded to a grid whose token count divides by `size`."""

    grid: Grid
    padded: Grid
    size: int
    index: torch.Tensor | None
    """(N,) where each real token (t-major in `grid`) sits in the t-major order of `padded`; None: no padding."""


def shard_plan(grid: Grid, size: int) -> ShardPlan:
    """The padding with the fewest extra tokens: one axis of the grid grows to the next length that makes the
    token count divisible by `size` (t-major order keeps real tokens' coordinates, so their RoPE is unchanged)."""
    n = math.prod(grid)
    if n % size == 0:
        return ShardPlan(tuple(grid), tuple(grid), size, None)
    best: Grid | None = None
    for axis in range(3):
        rest = n // grid[axis]
        step = size // math.gcd(rest, size)  # lengths of this axis that make rest * length divisible by size
        length = -(-grid[axis] // step) * step
        padded = tuple(length if a == axis else g for a, g in enumerate(grid))
        if best is None or math.prod(padded) < math.prod(best):
            best = padded
    gt, gh, gw = grid
    _, ph, pw = best
    t, h, w = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    return ShardPlan(tuple(grid), best, size, ((t * ph + h) * pw + w).reshape(-1))


def _padded_hook(plan: ShardPlan, scope: AttentionScope, group: Any):
    """Ulysses around attention over the real tokens only: the padding is neither attended to nor attends."""

    def hook(q, k, v, attend):
        q, k, v = (seq_to_heads(x, group) for x in (q, k, v))  # (B, H/sp, N_pad, Dh) each
        index = plan.index.to(q.device)
        real = scoped_attention(q[:, :, index], k[:, :, index], v[:, :, index], plan.grid, scope)  # (B, H/sp, N, Dh)
        out = q.new_zeros(q.shape)
        out[:, :, index] = real  # (B, H/sp, N_pad, Dh)
        return heads_to_seq(out, group)  # (B, H, N_pad/sp, Dh)

    return hook


class ParallelDiT(nn.Module):
    """An unchanged DiT run over one request's ranks; called like the DiT on (B, C, T, H, W) clips, same inputs on
    every rank, the whole prediction back on every rank.

    With a CFG group, an even batch is split in halves over its two ranks and the halves exchanged: the pipeline's
    guided calls hold [cond rows, uncond rows] (`TextToVideoPipeline._forward`'s `cfg_pairs`), so each branch runs
    on its own group and the predictions cross once per call. (Any even batch splits correctly, so an unguided one
    is shared too; an odd one runs whole on both.) With a sequence group, each rank runs 1/sp of the tokens.
    """

    def __init__(self, dit: DiT, groups: SamplingGroups):
        super().__init__()
        self.dit = dit
        self.groups = groups
        groups.parallel.check(dit.cfg)
        self.step_cache = None  # the pipeline's attribute; step caches decide per rank, so parallel runs go without
        self._hooks_for: Grid | None = None

    @property
    def cfg(self):
        return self.dit.cfg

    def forward(self, video, timestep, text_tokens, text_mask, text_pooled, drop_text=None, **extra) -> torch.Tensor:
        rows = video.shape[0]
        group = self.groups.cfg_group
        if group is None or rows % 2:
            return self._sequence_forward(video, timestep, text_tokens, text_mask, text_pooled, drop_text, **extra)
        half = slice(0, rows // 2) if self.groups.cfg_rank == 0 else slice(rows // 2, rows)

        def mine(x):
            return x[half] if torch.is_tensor(x) and x.ndim and x.shape[0] == rows else x

        args = [mine(x) for x in (video, timestep, text_tokens, text_mask, text_pooled, drop_text)]
        out = self._sequence_forward(*args, **{k: mine(v) for k, v in extra.items()}).contiguous()  # (B/2, C, T, H, W)
        both = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(both, out, group=group)
        return torch.cat(both)  # (B, C, T, H, W): cond rows, then uncond rows

    def _install(self, plan: ShardPlan) -> None:
        """The plain Ulysses hook when the tokens divide, the padding-aware one (per block scope) when not."""
        if self._hooks_for == plan.grid:
            return
        group = self.groups.sequence_group
        if plan.index is None:
            install_ulysses(self.dit, group)
        else:
            for block in self.dit.blocks:
                block.attn.hook = _padded_hook(plan, block.scope, group)
        self._hooks_for = plan.grid

    def _sequence_forward(
        self, video, timestep, text_tokens, text_mask, text_pooled, drop_text, **extra
    ) -> torch.Tensor:
        group = self.groups.sequence_group
        if group is None:
            return self.dit(video, timestep, text_tokens, text_mask, text_pooled, drop_text=drop_text, **extra)
        rank, size, cfg = self.groups.sequence_rank, self.groups.parallel.sequence, self.dit.cfg
        grid = patch_grid(tuple(video.shape[2:]), cfg.patch_size)
        plan = shard_plan(grid, size)
        self._install(plan)
        tokens = patchify(video, cfg.patch_size)  # (B, N, P)
        if plan.index is not None:
            padded = tokens.new_zeros(tokens.shape[0], math.prod(plan.padded), tokens.shape[2])  # (B, N_pad, P)
            padded[:, plan.index.to(tokens.device)] = tokens
            tokens = padded
        piece = tokens.chunk(size, dim=1)[rank]  # (B, N_pad/sp, P)
        layout = TokenLayout(((plan.padded, piece.shape[0]),), shard=(rank, size))  # where this rank's tokens sit
        out = self.dit(piece, timestep, text_tokens, text_mask, text_pooled, drop_text=drop_text, grids=layout, **extra)
        out = out.contiguous()  # (B, N_pad/sp, P_out)
        parts = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(parts, out, group=group)
        full = torch.cat(parts, dim=1)  # (B, N_pad, P_out)
        if plan.index is not None:
            full = full[:, plan.index.to(full.device)]  # (B, N, P_out)
        return unpatchify(full, grid, cfg.patch_size, cfg.predicted_channels)  # (B, C_out, T, H, W)


class ParallelPipeline(TextToVideoPipeline):
    """`TextToVideoPipeline` whose transformer(s) run over a request's ranks; `parallelize` after `load`."""

    groups: SamplingGroups | None = None

    def parallelize(self, groups: SamplingGroups) -> ParallelPipeline:
        groups.parallel.check(self.config.model)
        self.groups = groups
        if groups.parallel.enabled:
            self.model = ParallelDiT(self.model, groups)
            if getattr(self, "model_2", None) is not None:  # two-expert exports: both experts over the same ranks
                self.model_2 = ParallelDiT(self.model_2, groups)
        return self

    offers_step_caches = False  # each rank would decide on its own tokens

    def sample_latents(self, prompts, **options) -> torch.Tensor:
        """`TextToVideoPipeline.sample_latents` on every rank (the same latents everywhere), without step caches."""
        if options.get("step_cache") not in (None, "none"):
            raise ValueError(
                "step caches are not available with sequence or CFG parallelism (each rank would decide on its own "
                "tokens)"
            )
        options.pop("step_cache", None)
        return super().sample_latents(prompts, **options)

    @torch.no_grad()
    def __call__(self, prompts, **options) -> np.ndarray | None:
        """(B, T, H, W, 3) uint8 on rank 0, which alone decodes; None on the other ranks."""
        latents = self.sample_latents(prompts, **options)  # (B, C, T', H', W') on every rank
        if self.groups is not None and self.groups.rank != 0:
            return None
        video = self.autoencoder.decode(latents.to(self.device))  # (B, 3, T, H, W) in [-1, 1]
        return model_to_pixels(video).cpu().numpy()  # (B, T, H, W, 3) uint8
