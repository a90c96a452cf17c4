"""One optimizer step on one rank: micro-batches -> losses -> backward (ZeRO reduce-scatter) -> engine.step.

A micro-batch whose loss is not finite on any rank is skipped by every rank alike (its backward would be
a collective) and counted; `max_nonfinite_steps` in a row end the run. That end is decided collectively
(every rank sees the same all-reduced flag), so the ranks stop together and return normally instead of
raising: Ray Train retries worker errors, and a diverged run must end once, not `max_failures` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.train.recipe import Recipe, StageSpec

LOSS_TERMS = ("loss", "diffusion", "temporal_consistency", "motion_smoothness", "perceptual")


def step_seed(seed: int, global_step: int, rank: int, micro: int) -> int:
    """Seed of one micro-batch's randomness; independent of how the run was split into attempts."""
    return (seed * 1_000_003 + global_step * 10_007 + rank * 101 + micro) % (2**63 - 1)


def token_weights(tokens: list[float], total: float, world: int) -> list[float]:
    """Loss scales of this rank's micro-batches of `tokens` tokens each, `total` the tokens of the step's micro-batches
    on all `world` ranks (each rank draws as many): each micro-batch's token count over the mean micro-batch's. The
    mean of loss x scale over ranks and micro-batches, what DeepSpeed's averaged gradient follows, is then the mean
    over every token of the step."""
    mean = total / (world * len(tokens))
    return [t / mean for t in tokens]


@dataclass
class StepResult:
    means: np.ndarray
    """Mean over micro-batches and ranks of LOSS_TERMS."""
    epoch: int
    skipped: int
    """Non-finite micro-batches skipped during this step."""
    rows: int = 0
    """Rows of the stage stream all ranks drew in this step (skipped micro-batches included): the stream position moves
    by this."""
    clips: int = 0
    """Clips all ranks trained on (a sequence-parallel group's shared clips counted once)."""
    tokens: int = 0
    """Their tokens."""
    fatal: str | None = None
    """Set when `max_nonfinite_steps` consecutive micro-batches were non-finite: the run must end."""


@dataclass
class Stepper:
    """Runs optimizer steps of one stage on this rank."""

    recipe: Recipe
    stage: StageSpec
    engine: Any
    diffusion: Any
    grid: tuple[int, int, int]
    rank: int
    world: int
    device: torch.device
    perceptual: torch.nn.Module | None = None
    par: Any = None
    """`parallelize.Parallel`: sequence parallelism (a group shares a micro-batch and its noise); None = plain DP."""
    nan_at: int = 0
    """Fault injection for tests: a NaN loss on rank 0 in this global step..."""
    nan_count: int = 0
    """...for this many micro-batches in a row."""
    null_prompt: dict[str, Any] | None = None
    """`null_text: empty_prompt` models (Wan): the embedding of "" ({tokens (L, Dt), mask (L,), pooled (Dt,)}), which
    stands in for a dropped caption (such models have no learned null to drop to)."""
    bad_in_row: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.dtype = torch.bfloat16 if self.recipe.bf16 else torch.float32
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.model_cfg = self.recipe.model_config()
        cfg = self.recipe.diffusion
        self.cond_dropout = cfg.cond_dropout if self.stage.cond_dropout is None else self.stage.cond_dropout
        if self.null_prompt is not None:
            self.null_prompt = {k: torch.as_tensor(v).to(self.device) for k, v in self.null_prompt.items()}

    def _drop_captions(self, tokens, mask, pooled, drop):
        """Caption dropout: a learned null (drop_text) or, for empty-prompt models, rows replaced by the ""
        embedding."""
        if self.null_prompt is None:
            return tokens, mask, pooled, drop
        null, where = self.null_prompt, drop.view(-1, 1)  # (B, 1)
        tokens = torch.where(where[..., None], null["tokens"].to(tokens.dtype), tokens)  # (B, L, Dt)
        mask = torch.where(where, null["mask"].to(mask.dtype), mask)  # (B, L)
        pooled = torch.where(where, null["pooled"].to(pooled.dtype), pooled)  # (B, Dt)
        return tokens, mask, pooled, None

    def _allreduce(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _losses(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        from sora_model.captions import null_text_drop

        if "grids" in batch:
            return self._packed_losses(batch, gen)
        from sora_model.patch import unpatchify

        cfg = self.model_cfg
        x0 = unpatchify(batch["patches"].float(), self.grid, cfg.patch_size, cfg.predicted_channels)  # (B, C, T, H, W)
        cond, features = self._image_inputs(batch)
        tokens = batch["text_tokens"].to(self.dtype)  # (B, L, Dt): fp16 in transit
        mask = batch["text_mask"]  # (B, L)
        pooled = batch["text_pooled"].to(self.dtype)  # (B, Dt)
        drop = null_text_drop(x0.shape[0], self.cond_dropout, gen, device=self.device)  # (B,)
        tokens, mask, pooled, drop = self._drop_captions(tokens, mask, pooled, drop)
        engine, dtype, par = self.engine, self.dtype, self.par

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Image-to-video: the noisy latents, then the condition's mask and latents (Wan's channel order, as sampling
            # builds it); the loss covers only what the model predicts, the noisy latents' channels.
            x_in = x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (B, C_in, T, H, W)
            if par is not None:
                return par.forward(engine, x_in.to(dtype), t, tokens, mask, pooled, drop, features).float()
            return engine(x_in.to(dtype), t, tokens, mask, pooled, drop_text=drop, image_features=features).float()

        return self.diffusion.training_losses(
            model_fn, x0, self.stage.loss, generator=gen, num_tokens=self.num_tokens, perceptual_net=self.perceptual
        )

    def _image_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An image-to-video model's condition (B, C_in - C, T, H, W) (mask, then the conditioning latents) and image
        features (B, Li, Di) fp32, from the prepared columns (`sora data prepare --image-conditioning`); Nones for
        text-to-video."""
        from sora_model.patch import unpatchify

        cfg = self.model_cfg
        if cfg.in_channels == cfg.predicted_channels:
            return None, None
        channels = cfg.in_channels - cfg.predicted_channels
        cond = unpatchify(batch["image_condition"].float(), self.grid, cfg.patch_size, channels)  # (B, Cc, T, H, W)
        features = batch["image_features"].float() if cfg.image_dim is not None else None  # (B, Li, Di): fp16 before
        return cond, features

    def _packed_losses(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A mixed stage's packed micro-batch: clips of several grids in one forward (`grids=`), no padding."""
        from sora_model.attention import TokenLayout
        from sora_model.captions import null_text_drop
        from sora_model.patch import patchify, unpatchify

        cfg, engine, dtype = self.model_cfg, self.engine, self.dtype
        grids = batch["grids"]
        segments = TokenLayout.from_grids(grids).segments  # ((grid, count), ...): same-grid clips side by side
        sizes = [math.prod(g) * count for g, count in segments]
        parts = batch["patches"].float().split(sizes)  # per segment (count * N, P)
        x0s = [
            unpatchify(p.reshape(count, -1, p.shape[-1]), g, cfg.patch_size, cfg.predicted_channels)
            for p, (g, count) in zip(parts, segments)
        ]
        tokens, mask = batch["text_tokens"].to(dtype), batch["text_mask"]  # (clips, L, Dt), (clips, L)
        pooled = batch["text_pooled"].to(dtype)  # (clips, Dt)
        drop = null_text_drop(len(grids), self.cond_dropout, gen, device=self.device)  # (clips,)
        tokens, mask, pooled, drop = self._drop_captions(tokens, mask, pooled, drop)

        def model_fn(x_ts: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
            packed = torch.cat([patchify(x, cfg.patch_size).flatten(0, 1) for x in x_ts])  # (ΣN, P)
            out = engine(packed.to(dtype), t, tokens, mask, pooled, drop_text=drop, grids=grids).float()  # (ΣN, P)
            return [
                unpatchify(o.reshape(count, -1, o.shape[-1]), g, cfg.patch_size, cfg.predicted_channels)
                for o, (g, count) in zip(out.split(sizes), segments)
            ]

        return self.diffusion.training_losses_packed(
            model_fn,
            x0s,
            self.stage.loss,
            generator=gen,
            num_tokens=[math.prod(g) for g, _ in segments],
            perceptual_net=self.perceptual,
        )

    def _draw(self, batches: Any) -> tuple[dict[str, Any], int, int]:
        """The next micro-batch (the group reader's, on every rank of a sequence-parallel group), with the rows and
        tokens this rank drew for it (0 on a rank that only received it: each clip is counted once)."""
        batch = next(batches) if batches is not None else None
        drawn = size = 0
        if batch is not None:
            drawn = int(batch["rows"]) if "grids" in batch else int(batch["patches"].shape[0])
            size = sum(math.prod(g) for g in batch["grids"]) if "grids" in batch else drawn * self.num_tokens
        if self.par is not None:
            batch = self.par.share(batch)
        return batch, drawn, size

    def _token_weights(self, batches: list[dict[str, Any]]) -> list[float]:
        """Loss scale of each of this rank's packed micro-batches: its tokens over the mean tokens of a micro-batch
        of this step on any rank. DeepSpeed averages gradients over ranks and micro-batches, so with these scales
        the step's gradient is that of the token-weighted mean over every clip of the step (a pack of 10 tokens
        no longer weighs what a pack of 160 does). One-bucket micro-batches all hold as many tokens: 1 each."""
        if not batches or "grids" not in batches[0]:
            return [1.0] * len(batches)
        tokens = [float(sum(math.prod(g) for g in b["grids"])) for b in batches]
        return token_weights(tokens, self._allreduce([sum(tokens)])[0], self.world)

    def run(self, batches: Any, global_step: int) -> StepResult:
        """One optimizer step (global step `global_step + 1`) from `batches` (None on a rank that only receives)."""
        stage = self.stage
        sums = np.zeros(len(LOSS_TERMS))
        micro = skipped = epoch = drawn_here = 0
        rows = clips = tokens = 0.0
        # The step's micro-batches are drawn first: a packed stage weighs each by its share of all their tokens.
        pending = [self._draw(batches) for _ in range(stage.grad_accum)]
        weights = self._token_weights([b for b, _, _ in pending])
        while micro < stage.grad_accum:
            batch, drawn, size = pending.pop(0) if pending else self._draw(batches)
            weight = weights[micro] if micro < len(weights) else 1.0  # a replacement for a skipped one: its own scale
            epoch = max(epoch, int(batch["epoch"].max()))
            # Seeded by what the micro-batch is in the run (seed, step, data-parallel rank, draw within the step),
            # never by a counter of this attempt, so a resumed step draws the noise the uninterrupted one drew.
            seed_rank = self.par.dp_rank if self.par is not None else self.rank  # a sequence-parallel group draws alike
            gen = torch.Generator().manual_seed(step_seed(self.recipe.seed, global_step, seed_rank, drawn_here))
            drawn_here += 1
            self.engine.set_gradient_accumulation_boundary(micro == stage.grad_accum - 1)
            terms = self._losses({k: v for k, v in batch.items() if k != "epoch"}, gen)
            if self.nan_at and global_step + 1 == self.nan_at and self.nan_count > 0:
                self.nan_count -= 1
                if self.rank == 0:
                    terms["loss"] = terms["loss"] * float("nan")
            values = [
                float(terms[key].detach()) * weight for key in LOSS_TERMS
            ]  # every term is a tensor (combine_losses)
            bad = not all(math.isfinite(v) for v in values)
            n = len(LOSS_TERMS)
            reduced = self._allreduce([*(0.0 if bad else v for v in values), float(bad), float(drawn), float(size)])
            rows += reduced[n + 1]
            if reduced[n] > 0:
                del terms
                skipped += 1
                self.bad_in_row += 1
                if self.bad_in_row >= self.recipe.max_nonfinite_steps:
                    fatal = (
                        f"{self.bad_in_row} consecutive non-finite losses in stage '{stage.name}' at step "
                        f"{global_step + 1}: stopped; the last good checkpoint is intact (lower the stage's lr or "
                        "raise warmup_steps, then --resume)"
                    )
                    return StepResult(sums, epoch, skipped, int(rows), int(clips), int(tokens), fatal)
                continue
            self.bad_in_row = 0
            sums += np.asarray(reduced[:n]) / self.world
            clips += reduced[n + 1]
            tokens += reduced[n + 2]
            self.engine.backward(terms["loss"] * weight * (self.par.loss_scale if self.par is not None else 1.0))
            self.engine.step()
            micro += 1
        return StepResult(sums / stage.grad_accum, epoch, skipped, int(rows), int(clips), int(tokens))
