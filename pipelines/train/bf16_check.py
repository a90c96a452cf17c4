"""bf16 against fp32: one recipe stage trained N steps in each from the same seed, through the trainer's own engine
(`engine.build_engine`: DeepSpeed, the recipe's ZeRO stage) and step function (`step.Stepper`), one rank each.

    python -m pipelines.train.bf16_check --recipe cluster/recipes/smoke-cpu.yaml --stage clips --steps 20

Each precision runs in a fresh process (gloo, world 1, DeepSpeed's CPU accelerator), so the two engines share
nothing. Both draw the same micro-batches (the synthetic shapes, rendered in memory at the stage's clip size, with
a fixed embedding per caption: no Ray, no text encoder) and, step for step, the same timesteps, noise and caption
dropout (the Stepper seeds them by step and rank). What differs is only the engine's precision: under bf16 every
parameter is bf16 and the fp32 masters live in the optimizer (`sora_model/precision.py` says what still
computes in fp32). Prints the two loss curves and their largest relative gap as JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any

import numpy as np
import torch

TEXT_LENGTH = 8
"""Caption tokens per clip in the in-memory batches (the synthetic captions are 6 words)."""


def stage_batches(recipe: Any, stage: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches of `stage.micro_batch` synthetic clips in the trainer's batch layout, deterministic."""
    from pipelines.data import grammar
    from pipelines.data.synth import SynthSpec, make_video
    from sora_model.patch import patchify

    cfg = recipe.model_config()
    if cfg.in_channels != 3 or stage.height != stage.width:
        raise ValueError(
            "the bf16 check renders square RGB clips: it needs a pixel-space model (in_channels 3) and a square stage"
        )
    spec = SynthSpec(size=stage.height, frames=max(stage.frames, 2), seed=recipe.seed)
    combos = grammar.all_combinations()
    g = torch.Generator().manual_seed(recipe.seed)
    captions = torch.randn(len(combos), TEXT_LENGTH, cfg.text_dim, generator=g)  # one fixed embedding per caption
    batches = []
    for b in range(count):
        idx = [(b * stage.micro_batch + i) % len(combos) for i in range(stage.micro_batch)]
        clips = np.stack([make_video(spec, i, combos[i])[: stage.frames] for i in idx])  # (B, T, H, W, 3) uint8
        video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, 3, T, H, W) in [-1, 1]
        tokens = captions[idx]  # (B, L, Dt)
        batches.append(
            {
                "patches": patchify(video, cfg.patch_size),
                "text_tokens": tokens,
                "text_mask": torch.ones(len(idx), TEXT_LENGTH, dtype=torch.bool),
                "text_pooled": tokens.mean(1),
                "epoch": torch.zeros(len(idx), dtype=torch.long),
            }
        )
    return batches


def train_curve(recipe_data: dict[str, Any], stage_name: str, steps: int, bf16: bool) -> list[float]:
    """The loss of each of `steps` optimizer steps of one stage on this process (torch.distributed must be up)."""
    from pipelines.train.engine import build_engine
    from pipelines.train.recipe import parse_recipe
    from pipelines.train.step import Stepper
    from sora_model.diffusion import build_diffusion
    from sora_model.patch import patch_grid

    recipe = parse_recipe(
        {**recipe_data, "device": "cpu", "deepspeed": {**recipe_data.get("deepspeed", {}), "bf16": bf16}}
    )
    stage = next(s for s in recipe.stages if s.name == stage_name)
    stage.steps, stage.checkpoint_every = steps, 0
    recipe.stages = [stage]  # the engine's batch sizes and the LR schedule are this stage's
    engine, _ = build_engine(recipe, world=1)
    assert engine.bfloat16_enabled() == bf16
    grid = patch_grid(stage.shape, recipe.model_config().patch_size)
    stepper = Stepper(recipe, stage, engine, build_diffusion(recipe.diffusion), grid, 0, 1, torch.device("cpu"))
    batches = iter(stage_batches(recipe, stage, steps * stage.grad_accum))
    engine.train()
    losses = []
    counted = "consumed" in inspect.signature(stepper.run).parameters  # a Stepper that counts micro-batches drawn
    drawn = 0
    for step in range(steps):
        out = stepper.run(batches, step, drawn) if counted else stepper.run(batches, step)
        result, drawn = out if isinstance(out, tuple) else (out, 0)
        losses.append(float(result.means[0]))
    return losses


def _child(recipe_data: dict[str, Any], stage_name: str, steps: int, bf16: bool, port: int, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        queue.put(("ok", train_curve(recipe_data, stage_name, steps, bf16)))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it there
        queue.put(("error", f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_curves(recipe_path: str, stage_name: str, steps: int = 20) -> dict[str, list[float]]:
    """{"fp32": losses, "bf16": losses}: the stage trained `steps` steps in each precision, each in its own process."""
    import multiprocessing as mp

    import yaml

    with open(recipe_path) as f:
        data = yaml.safe_load(f)
    ctx = mp.get_context("spawn")
    curves = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(data, stage_name, steps, bf16, _free_port(), queue))
        proc.start()
        status, value = queue.get(timeout=900)
        proc.join(60)
        if status != "ok":
            raise RuntimeError(f"{name} run failed: {value}")
        curves[name] = value
    return curves


def relative_gaps(curves: dict[str, list[float]]) -> list[float]:
    """|bf16 - fp32| / fp32, step by step."""
    return [abs(b - a) / abs(a) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train.bf16_check", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="cluster/recipes/smoke-cpu.yaml")
    p.add_argument("--stage", default="clips", help="the recipe stage to train (its clip size, batch, lr and losses)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    curves = loss_curves(args.recipe, args.stage, args.steps)
    gaps = relative_gaps(curves)
    print(json.dumps({**curves, "max_relative_gap": max(gaps), "final_relative_gap": gaps[-1]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
