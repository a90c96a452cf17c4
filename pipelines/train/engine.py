"""The DeepSpeed engine of one rank: the config built from the recipe, the model, optimizer and schedule.

    config = ds_config(recipe, recipe.stages[0], world=8)     # a plain dict, what deepspeed.initialize takes
    engine, module = build_engine(recipe, world)              # inside a worker (torch.distributed is up)

Also what the GPU check and the benchmarks build, so the engine a benchmark measures is the one the
workers train with.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipelines.train.recipe import Recipe, StageSpec


def lr_at(recipe: Recipe, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based over the whole curriculum).

    Each stage warms up linearly from 0 and then stays constant or follows a cosine to
    `min_lr_ratio * lr` at its end. One schedule for the whole run keeps the LR state a single
    counter that DeepSpeed saves and restores with the optimizer.
    """
    offset = 0
    for stage in recipe.stages:
        if step < offset + stage.steps or stage is recipe.stages[-1]:
            k = min(step - offset, stage.steps - 1)
            if k < stage.warmup_steps:
                return stage.lr * (k + 1) / stage.warmup_steps
            if stage.lr_schedule == "constant":
                return stage.lr
            progress = (k - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
            return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        offset += stage.steps
    raise AssertionError("unreachable")


def uses_client_optimizer(recipe: Recipe) -> bool:
    """torch's AdamW on cpu: DeepSpeed's own CPU Adam is a C++ extension build away on CPU-only machines."""
    return recipe.device == "cpu" and not recipe.deepspeed.offload_optimizer


def _zero_section(recipe: Recipe) -> dict[str, Any]:
    ds = recipe.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=True, reduce_bucket_size=ds.reduce_bucket_size)
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.reduce_bucket_size
    else:
        zero.update(
            stage3_prefetch_bucket_size=ds.prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.param_persistence_threshold,
            stage3_max_live_parameters=ds.max_live_parameters,
            zero_hpz_partition_size=ds.hpz_partition_size,
        )
    pin = recipe.device == "cuda"  # page-locked host buffers only help (and only exist) beside a GPU
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def ds_config(recipe: Recipe, stage: StageSpec, world: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run (its batch sizes are the given stage's; later stages reset them)."""
    ds = recipe.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.micro_batch * stage.grad_accum * world,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": _zero_section(recipe),
        "bf16": {"enabled": recipe.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # A checkpoint written by another number of ranks is converted to DeepSpeed's universal format
        # first (trainer.py); loading it then re-partitions weights and optimizer state for this world.
        "checkpoint": {"load_universal": load_universal},
    }
    if recipe.bf16 and ds.fp32_reduce:
        config["communication_data_type"] = "fp32"
        if ds.zero_stage > 0:  # plain data parallelism keeps gradients in the model's dtype
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    if uses_client_optimizer(recipe):
        config["zero_allow_untested_optimizer"] = True
    else:
        # lr 1.0: the LambdaLR schedule returns absolute learning rates.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": 1.0, "betas": list(ds.betas), "weight_decay": ds.weight_decay},
        }
    return config


def build_engine(recipe: Recipe, world: int, load_universal: bool = False) -> tuple[Any, torch.nn.Module]:
    """(DeepSpeed engine, its module) for this rank; torch.distributed must be initialised.

    Same seed on every rank: identical initial weights, which ZeRO-3 then partitions. `init_from` weights and
    LoRA adapters are in place before that (finetune.py: under ZeRO-3 they arrive as partitions, built on the
    meta device and read, or for a seeded init replayed, by rank 0 a tensor at a time); the optimizer steps only
    what trains.
    """
    import deepspeed

    from pipelines.train.finetune import build_model, trainable_parameters

    ds = recipe.deepspeed
    config = ds_config(recipe, recipe.stages[0], world, load_universal)
    model = build_model(recipe, config)  # under ZeRO-3 already partitioned (no rank holds it whole)
    if ds.zero_stage == 3 and ds.gather_per_block:
        from deepspeed.utils import set_z3_leaf_modules

        from sora_model.dit import DiTBlock

        set_z3_leaf_modules(model, [DiTBlock])  # one gather per block (its LoRA adapters included)
    params = trainable_parameters(model)
    client_opt = None
    if uses_client_optimizer(recipe):
        client_opt = torch.optim.AdamW(params, lr=1.0, betas=ds.betas, weight_decay=ds.weight_decay)

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(recipe, s))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=client_opt,
        model_parameters=None if client_opt else params,
        lr_scheduler=make_scheduler,
        config=config,
        dist_init_required=False,
    )
    return engine, engine.module
