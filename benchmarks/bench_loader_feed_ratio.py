"""Train-step throughput with the real Ray Data loader ÷ with the same batches already in memory (2 workers).

What is compared: the demo model (`cluster/recipes/demo-cpu.yaml`'s DiT-demo) trained by a Ray Train
`TorchTrainer` with 2 workers, DeepSpeed ZeRO-3 on CPU, through the trainer's own pieces
(`engine.build_engine`, `step.Stepper`, the stage stream of `data.py` split across the ranks exactly as
`worker.py` does). In the same workers and engine, rounds alternate: N steps drawing micro-batches from
the loader (Ray Data read tasks, streaming split, local shuffle, collate, prefetch), then N steps over
micro-batches drawn beforehand and held in memory. The figure is the median over rounds of
(loader steps/s) / (memory steps/s); 1.0 means the loader never makes a step wait.

Why fair: same model, engine, step code, batch shapes and world size; rounds interleave, so load from
other processes lands on both sides. Synthetic clips are made and prepared by the real `sora data`
commands first (not timed).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import main, paired_ratio, summary

FIGURE = "loader_feed_ratio"
GOAL = (">=", 0.95)
ROOT = Path(__file__).resolve().parents[1]


def _loop(config: dict) -> None:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import torch

    from pipelines.train.engine import build_engine
    from pipelines.train.recipe import parse_recipe
    from pipelines.train.step import Stepper
    from pipelines.train.worker import _stage_stream
    from sora_model.diffusion import build_diffusion

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    recipe = parse_recipe(config["recipe"])
    stage = recipe.stages[0]
    engine, _ = build_engine(recipe, world)
    stepper = Stepper(
        recipe,
        stage,
        engine,
        build_diffusion(recipe.diffusion),
        tuple(config["stages"][stage.name]["grid"]),
        rank,
        world,
        torch.device("cpu"),
    )
    n, rounds = config["steps"], config["rounds"]
    stream = config["stages"][stage.name]["stream"]
    loader = _stage_stream(recipe, stream, stage, 0, 2 + n * (2 * rounds + 1), rank, world, torch.device("cpu"))
    step = 0

    def steps(batches, count):
        nonlocal step
        t0 = time.perf_counter()
        for _ in range(count):
            stepper.run(batches, step)
            step += 1
        return time.perf_counter() - t0

    steps(loader, 2)  # warm-up: Ray Data's first blocks, DeepSpeed's first step
    memory = [next(loader) for _ in range(n * stage.grad_accum)]
    times = {"loader": [], "memory": []}
    for r in range(rounds):
        for side in ("loader", "memory") if r % 2 == 0 else ("memory", "loader"):
            times[side].append(steps(loader if side == "loader" else iter(memory), n))
    if rank == 0:  # Ray Train V2 keeps metrics only beside checkpoints: hand the times over in a file
        import json

        with open(config["out"], "w") as f:
            json.dump(times, f)


def run(quick: bool) -> dict:
    import ray
    import yaml
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cli import main as sora
    from pipelines.data.load import bucket_files
    from pipelines.train.data import StagePlan, StageStream
    from pipelines.train.recipe import parse_recipe, recipe_to_dict

    steps, rounds = (10, 3) if quick else (25, 5)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    assert (
        sora(
            [
                "data",
                "synth",
                "--out",
                str(work / "shapes"),
                "--num-videos",
                "96",
                "--size",
                "32",
                "--frames",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        sora(
            [
                "data",
                "prepare",
                "--manifest",
                str(work / "shapes" / "captions.jsonl"),
                "--out",
                str(work / "clips"),
                "--resolution",
                "32",
                "--frames",
                "8",
                "--text-hidden-layer",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    data = yaml.safe_load((ROOT / "cluster" / "recipes" / "demo-cpu.yaml").read_text())
    long = [s for s in data["stages"] if s["frames"] == 8][-1]
    data["stages"] = [{**long, "name": "bench", "dataset": "8x32x32", "sample_prompts": []}]
    recipe = parse_recipe(data)
    files = bucket_files(work / "clips", "8x32x32")[2]
    plan = StagePlan.from_files(files, recipe.seed, 0)
    # as the trainer does when the workers hold every CPU: 0-CPU readers, each rank reading its share in the worker
    stream = StageStream(plan, long["micro_batch"], 0, 0.0, readers=2)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    config = {
        "recipe": recipe_to_dict(recipe),
        "stages": {"bench": {"grid": [8, 8, 8], "start_sample": 0, "stream": stream}},
        "steps": steps,
        "rounds": rounds,
        "out": str(work / "times.json"),
    }
    trainer = TorchTrainer(
        _loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="bench-loader",
            storage_path=str(work / "ray"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
        ),
    )
    trainer.fit()
    ray.shutdown()
    metrics = json.loads((work / "times.json").read_text())
    loader, memory = metrics["loader"], metrics["memory"]
    ratio = paired_ratio(memory, loader)  # throughput ratio = time(memory) / time(loader)
    return {
        "value": round(ratio, 3),
        "compared": (
            "train steps/s of DiT-demo on 2 ZeRO-3 CPU workers: Ray Data loader / batches in memory "
            f"({steps} steps x {rounds} rounds)"
        ),
        "details": {
            "loader_seconds": summary(loader),
            "memory_seconds": summary(memory),
            "micro_batch": long["micro_batch"],
            "clips": plan.rows_per_epoch,
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
