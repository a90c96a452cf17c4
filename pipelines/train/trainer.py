"""`sora train`: Ray Train + DeepSpeed ZeRO-3 through a recipe's curriculum, then `RUN/export/`.

    sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/images,data/clips --run-dir runs/smoke
    python -m pipelines.train.trainer --recipe cluster/recipes/demo-cpu.yaml --data data/images,data/short,data/long --run-dir runs/demo
    ray job submit --working-dir . -- python -m pipelines.train.trainer \
        --recipe cluster/recipes/article-5stage.yaml --data /mnt/prepared/s1,/mnt/prepared/s2 --run-dir /mnt/runs/article

The run folder (rank 0 writes it, so on a multi-node cluster it must be on shared storage):

    RUN/recipe.yaml, RUN/run.json         the recipe and arguments the run started with
    RUN/ray_results/<recipe name>/        Ray Train's run: checkpoint_<step>/ (every rank's DeepSpeed shard,
                                          ema/rank<r>.safetensors, rng/rank<r>.json, trainer_state.json)
    RUN/metrics.csv, RUN/tensorboard/     one row / event per optimizer step
    RUN/workers.json                      rank -> node id, ZeRO-3 partition size
    RUN/samples/<stage>.gif               the stage's sample prompts at its end
    RUN/loss.png, RUN/export/             at the end: loss curve; model.safetensors (+ ema) and config.json

A lost worker or node restarts the workers from the last checkpoint (up to the recipe's `max_failures`);
`--resume` continues a stopped or failed run (the same RUN, so the same Ray storage path and name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from pipelines.train.recipe import Recipe, StageData, load_recipe, recipe_to_dict, resolve_stage_data

RAY_RESULTS = "ray_results"
CRASH_ENV = "SORA_TRAIN_CRASH_AT_STEP"
"""Fault injection for tests: the last rank dies once after this global step (a lost worker)."""
NAN_ENV = "SORA_TRAIN_NAN_AT_STEP"
"""Fault injection for tests: a non-finite loss in this step (`N` or `N:COUNT` micro-batches in a row)."""


def _user_error(message: str) -> Exception:
    from pipelines.cli import UserError

    return UserError(message)


@dataclass
class TrainOptions:
    recipe: str
    data: list[str]
    run_dir: str
    workers: int | None = None
    resume: bool = False
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this global step; `--resume` continues. For job slots and tests."""


def _check_run_dir(opts: TrainOptions, recipe: Recipe) -> str:
    run_dir = os.path.abspath(opts.run_dir)
    ray_run = os.path.join(run_dir, RAY_RESULTS, recipe.name)
    if opts.resume:
        if not os.path.isdir(ray_run):
            raise _user_error(f"nothing to resume: {ray_run} does not exist (start the run without --resume)")
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise _user_error(f"run dir {run_dir} already exists; pass --resume to continue it, or choose a new --run-dir")
    return run_dir


def _resources(num_workers: int, use_gpu: bool, cluster_cpus: float) -> tuple[dict[str, float], bool]:
    """Per-worker resources, and whether the datasets must be materialised before training starts.

    One CPU per worker when the cluster has them (and Ray sets OMP threads to match), else an equal
    share so N workers fit a laptop. When the workers leave less than a CPU free, Ray Data's read
    tasks could never be scheduled during training, so the (small) datasets are read up front.
    """
    cpus = 1.0 if cluster_cpus >= num_workers else cluster_cpus / num_workers
    resources: dict[str, float] = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = 1.0
    return resources, cluster_cpus - cpus * num_workers < 1


def build_trainer(opts: TrainOptions, recipe: Recipe, stage_data: dict[str, StageData], run_dir: str):
    """The TorchTrainer for a run (Ray must be initialised)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.data.load import load_prepared
    from pipelines.train.worker import BATCH_COLUMNS, train_loop_per_worker

    num_workers = opts.workers or recipe.workers
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= num_workers
    per_worker, materialize = _resources(num_workers, use_gpu, float(resources.get("CPU", 1)))

    stages: dict[str, dict[str, Any]] = {}
    datasets = {}
    for i, stage in enumerate(recipe.stages):
        sd = stage_data[stage.name]
        per_rank = sd.num_clips // num_workers
        batches_per_epoch = per_rank // stage.micro_batch
        if batches_per_epoch < 1:
            raise _user_error(
                f"stages[{i}] ({stage.name}): {sd.num_clips} clips in bucket {sd.bucket} are fewer than "
                f"micro_batch {stage.micro_batch} x {num_workers} workers; prepare more clips or lower micro_batch"
            )
        stages[stage.name] = {"grid": list(sd.grid), "num_clips": sd.num_clips, "batches_per_epoch": batches_per_epoch}
        ds = load_prepared(sd.paths, bucket=sd.bucket, columns=list(BATCH_COLUMNS))
        datasets[stage.name] = ds.materialize() if materialize else ds

    nan_at, _, nan_count = os.environ.get(NAN_ENV, "").partition(":")
    config = {
        "recipe": recipe_to_dict(recipe),
        "run_dir": run_dir,
        "stages": stages,
        "use_gpu": use_gpu,
        "crash_at_step": int(os.environ.get(CRASH_ENV) or 0),
        "nan_at_step": int(nan_at or 0),
        "nan_count": int(nan_count or 1),
        "stop_at_step": opts.stop_at_step or 0,
    }
    env_vars = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        datasets=datasets,
        run_config=RunConfig(
            name=recipe.name,
            storage_path=os.path.join(run_dir, RAY_RESULTS),
            failure_config=FailureConfig(max_failures=recipe.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.keep_checkpoints),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )


def train(opts: TrainOptions) -> dict[str, Any]:
    """Validate everything that can be checked without Ray, then run the trainer; returns a summary."""
    recipe = load_recipe(opts.recipe)
    if opts.workers is not None and opts.workers < 1:
        raise _user_error(f"--workers must be >= 1, got {opts.workers}")
    workers = opts.workers or recipe.workers
    if workers % recipe.sequence_parallel_size:
        raise _user_error(f"sequence_parallel_size {recipe.sequence_parallel_size} must divide the number of workers ({workers})")
    if opts.stop_at_step is not None and opts.stop_at_step < 1:
        raise _user_error(f"--stop-at-step must be >= 1, got {opts.stop_at_step}")
    if not opts.data:
        raise _user_error("--data needs at least one prepared folder")
    stage_data = resolve_stage_data(recipe, opts.data)
    run_dir = _check_run_dir(opts, recipe)
    os.makedirs(run_dir, exist_ok=True)
    if not opts.resume:
        shutil.copyfile(opts.recipe, os.path.join(run_dir, "recipe.yaml"))
    with open(os.path.join(run_dir, "run.json"), "a") as f:
        args = {"recipe": os.path.abspath(opts.recipe), "data": [os.path.abspath(d) for d in opts.data],
                "workers": opts.workers or recipe.workers, "resume": opts.resume, "stop_at_step": opts.stop_at_step,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        f.write(json.dumps(args) + "\n")

    from pipelines.data.runtime import ensure_ray

    ensure_ray()
    trainer = build_trainer(opts, recipe, stage_data, run_dir)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface the worker's own one-line message
        raise RuntimeError(_root_message(err)) from err
    summary = {
        "run_dir": run_dir,
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": dict(result.metrics or {}),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": os.path.join(run_dir, "export") if os.path.isfile(os.path.join(run_dir, "export", "config.json")) else None,
    }
    return summary


def _root_message(err: BaseException) -> str:
    """The innermost worker error of a Ray Train failure, on one line."""
    text = str(err)
    for marker in ("NonFiniteLossError: ", "RuntimeError: ", "ValueError: "):
        if marker in text:
            tail = text.rsplit(marker, 1)[1].strip().splitlines()
            if tail:
                return tail[0]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="curriculum YAML, e.g. cluster/recipes/smoke-cpu.yaml")
    p.add_argument("--data", required=True, help="prepared folder(s), comma-separated; stages name buckets inside them")
    p.add_argument("--run-dir", required=True, help="run folder: checkpoints, metrics, samples, export")
    p.add_argument("--workers", type=int, help="Ray Train workers / DeepSpeed ranks (default: the recipe's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--stop-at-step", type=int, help="stop with a checkpoint after this global step (continue with --resume)")


def run(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        recipe=args.recipe,
        data=[d for d in args.data.split(",") if d.strip()],
        run_dir=args.run_dir,
        workers=args.workers,
        resume=args.resume,
        stop_at_step=args.stop_at_step,
    )
    summary = train(opts)
    where = summary["export"] or f"{summary['run_dir']} (stopped; continue with --resume)"
    print(f"trained in {summary['seconds']}s; {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train.trainer ARGS` is `sora train ARGS` (same parser, same error handling)."""
    from pipelines.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
