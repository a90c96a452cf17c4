"""`sora generate --sequence-parallel N [--cfg-parallel]`: one clip sampled by N (x2) local processes.

    sora generate --model exports/wan-14b --prompt "..." --sequence-parallel 4 --cfg-parallel --out clip.mp4
    sora generate --model runs/demo/export --prompt "..." --sequence-parallel 2 --device cpu --out clip.npz

Each process is one rank (gloo on CPU, NCCL on cuda, rank r on cuda:r), started with torch.multiprocessing's
spawn and joined by a TCP rendezvous on loopback. Every rank loads the export and samples with the same seed
(`sampling.ParallelPipeline`); rank 0 decodes and writes the file, which equals what one process writes.
Problems the user can fix are found before any process starts (the split against the model's heads, the
arguments) or by the ranks' own checks, and come back as one line.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from .config import RENDEZVOUS_TIMEOUT, ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, target: Callable[..., Any], parallel: ParallelConfig, device: str, init: str, results: Any, args: tuple
) -> None:
    """One rank: join the world, form the groups, run `target(groups, device, *args)`; rank 0 hands back its result
    (or the one-line message of a user-fixable error, which every rank meets alike before any collective)."""
    import torch
    import torch.distributed as dist

    from pipelines.cli import UserError
    from sora_model.config import ConfigError

    from .sampling import new_sampling_groups

    world = parallel.world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the host's cores
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=RENDEZVOUS_TIMEOUT,
    )
    try:
        groups = new_sampling_groups(parallel)
        try:
            result = ("ok", target(groups, device, *args))
        except (UserError, ConfigError, FileNotFoundError, ValueError) as err:
            result = ("error", str(err))
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def run_parallel(target: Callable[..., Any], parallel: ParallelConfig, device: str, *args: Any) -> Any:
    """Run `target(groups, device, *args)` on `parallel.world_size` local processes; rank 0's return value.

    device: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank). `target` and `args` must pickle (spawn).
    A user-fixable error on the ranks is raised here as a `UserError`.
    """
    import torch
    import torch.multiprocessing as mp

    from pipelines.cli import UserError

    if device == "cuda" and torch.cuda.device_count() < parallel.world_size:
        raise UserError(
            f"sequence and CFG parallelism over {parallel.world_size} ranks need {parallel.world_size} GPUs, "
            f"this machine has {torch.cuda.device_count()}"
        )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _rank_main,
        args=(target, parallel, device, init, results, args),
        nprocs=parallel.world_size,
        join=True,
        start_method="spawn",
    )
    status, value = results.get()
    if status == "error":
        raise UserError(value)
    return value


def generate_parallel(args: argparse.Namespace) -> str:
    """`sora generate` over `--sequence-parallel` (x2 with `--cfg-parallel`) processes, after `generate`'s own
    argument checks. Returns the output path."""
    from pipelines.cli import UserError
    from sora_model.pipeline import load_export_config

    for flag in ("image", "last_image", "step_cache"):
        if getattr(args, flag, None) not in (None, "none"):
            raise UserError(f"--{flag.replace('_', '-')} is not available with --sequence-parallel/--cfg-parallel yet")
    parallel = ParallelConfig(args.sequence_parallel, args.cfg_parallel)
    parallel.check(load_export_config(args.model).model, field="--sequence-parallel")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(
            f"--device must be cpu, cuda or auto with --sequence-parallel (rank r uses cuda:r), got '{device}'"
        )
    out, line = run_parallel(_generate_rank, parallel, device, args)
    print(line)
    return out


def _generate_rank(groups: Any, device: str, args: argparse.Namespace) -> tuple[str, str] | None:
    """One rank of `generate_parallel`: the same defaults and checks as `sora generate`; rank 0 writes the clip."""
    from tqdm import tqdm

    from pipelines.serve.params import cli_sampling, model_card
    from sora_model.video import write_video

    from .sampling import ParallelPipeline

    pipe = ParallelPipeline.load(args.model, device=device, precision=args.precision, lora=args.lora).parallelize(
        groups
    )
    card = model_card(pipe)
    frames, height, width, steps, sampler = cli_sampling(args, card)
    bar: Any = tqdm(
        total=steps, desc="sampling", unit="step", disable=args.no_progress or groups.rank != 0, file=sys.stderr
    )
    try:
        clips = pipe(
            args.prompt,
            num_frames=frames,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            sampler=sampler,
            negative_prompt=args.negative_prompt,
            callback=lambda step, total: bar.update(1),
        )
    finally:
        bar.close()
    if clips is None:
        return None
    clip = clips[0]  # (T, H, W, 3) uint8
    out = write_video(args.out, clip, fps=args.fps or card.fps)
    p = groups.parallel
    return out, (
        f"wrote {out}: {clip.shape[0]} frames at {clip.shape[2]}x{clip.shape[1]}, seed {args.seed}, {steps} "
        f"{sampler} steps, {p.world_size} ranks (sequence {p.sequence}{', cfg 2' if p.cfg else ''})"
    )
