r"""`sora train`: Ray Train + DeepSpeed through a recipe's curriculum, then `RUN/export/`.

    sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/images,data/clips --run-dir runs/smoke
    sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/images,data/clips --run-dir runs/smoke \
        --resume --workers 1
    python -m pipelines.train.trainer --recipe cluster/recipes/demo-cpu.yaml \
        --data data/images,data/short,data/long --run-dir runs/demo
    ray job submit --working-dir . -- python -m pipelines.train.trainer --device cuda \
        --recipe cluster/recipes/article-5stage.yaml --data /mnt/prepared/s1,/mnt/prepared/s2 \
        --run-dir s3://bucket/runs/article

The device is declared (recipe `device:` or `--device`): cuda workers each ask Ray for a GPU, so an
autoscaler adds GPU nodes; a cluster with too few GPUs and no autoscaler is an error in seconds. The run
folder is a local path (shared storage on a multi-node cluster) or any fsspec URI (`s3://...`):

    RUN/recipe.yaml, RUN/run.json         the recipe and arguments the run started (and resumed) with
    RUN/ray_results/<recipe name>/        Ray Train's run: checkpoint_<step>/ (see checkpoint.py), one set of
                                          files per rank, convertible to any other number of ranks
    RUN/metrics.csv, RUN/tensorboard/     one row / event per optimizer step (rank 0)
    RUN/workers.json                      rank -> node id, ZeRO-3 partition size, digest of the start weights
    RUN/exports/<stage>/                  at each stage end: model.safetensors (+ ema) and config.json
    RUN/samples/<stage>.gif               the stage's sample prompts, rendered from that export by an actor
    RUN/loss.png, RUN/export/             at the end: loss curve; the final export (what `sora serve` loads)
    RUN/fatal.json                        why a run ended for good (diverged), with the step

A lost worker or node restarts the workers from the last checkpoint (up to the recipe's `max_failures`);
a diverged loss ends the run once. `--resume` continues a stopped or failed run (the same RUN), with any
number of workers: a checkpoint of another world size is first converted to DeepSpeed's universal form.
The loop itself is in worker.py (it reads the one frozen WorkerConfig of worker_config.py; rank 0's files are
rank_zero.py's), with engine.py, step.py, checkpoint.py, ema.py, data.py, metrics.py, samples.py and storage.py
beside it; finetune.py starts a run from an export (`init_from`, LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from pipelines import console
from pipelines.train.checkpoint import TRAINER_STATE, make_portable
from pipelines.train.finetune import check_init
from pipelines.train.rank_zero import FATAL_FILE
from pipelines.train.recipe import Recipe, load_recipe
from pipelines.train.samples import finish_sampler, start_sampler
from pipelines.train.stage_data import StageData, resolve_stage_data
from pipelines.train.storage import RunStore
from pipelines.train.worker_config import (
    DEFAULT_NAN_COUNT,
    WORKER_CONFIG_KEY,
    FaultInjection,
    StageInput,
    WorkerConfig,
)

RAY_RESULTS = "ray_results"
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Where Ray Train's controller lists the checkpoints it registered (what a resumed run restores from)."""
CRASH_ENV = "SORA_TRAIN_CRASH_AT_STEP"
"""Fault injection for tests: the last rank dies once after this global step (a lost worker)."""
NAN_ENV = "SORA_TRAIN_NAN_AT_STEP"
"""Fault injection for tests: a non-finite loss in this step (`N` or `N:COUNT` micro-batches in a row)."""
DEVICE_WAIT_ENV = "SORA_TRAIN_GPU_WAIT_S"
DEVICE_WAIT_S = float(os.environ.get(DEVICE_WAIT_ENV) or 900.0)
"""How long `sora train` waits for an autoscaler to add the GPUs a cuda run asks for (cloud GPU nodes take minutes)."""
DEFAULT_GPU_WORKER_CPUS = 8.0
"""CPUs per GPU worker when the recipe does not say: its loader, the host side of the step, CPU offload."""
MIN_READ_CPUS = 0.25
"""Below this many CPUs left spare by the workers, read tasks ask for none (on a laptop the workers take them all)."""
MAX_READ_CPUS = 1.0
"""The CPUs a stage's read tasks ask for at most (reading Parquet is light)."""
READERS_PER_RANK = 2
"""Read tasks in flight per reading rank (`data.StageStream.readers`)."""


def _user_error(message: str) -> Exception:
    from pipelines.cli import UserError

    return UserError(message)


@dataclass
class TrainOptions:
    recipe: str
    data: list[str]
    run_dir: str
    workers: int | None = None
    device: str | None = None
    """`cpu` or `cuda`; None keeps the recipe's `device`."""
    resume: bool = False
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this global step; `--resume` continues. For job slots and tests."""
    profile: int = 0
    """Record a torch.profiler trace of this many steps (after one warm-up step) into RUN/profile/ (profile.py)."""


def _check_run_dir(opts: TrainOptions, recipe: Recipe) -> RunStore:
    store = RunStore(opts.run_dir)
    if opts.resume:
        if not store.exists(f"{RAY_RESULTS}/{recipe.name}"):
            raise _user_error(
                f"nothing to resume: {store.url(RAY_RESULTS + '/' + recipe.name)} does not exist (start the run "
                "without --resume)"
            )
    elif not store.is_empty():
        raise _user_error(
            f"run dir {store.url()} already exists; pass --resume to continue it, or choose a new --run-dir"
        )
    return store


def _resources(recipe: Recipe, num_workers: int, cluster_cpus: float) -> dict[str, float]:
    """Per-worker resources, from the declared device (never from what the cluster holds right now).

    cuda: one GPU and `cpus_per_worker` CPUs (default 8) per worker, whether or not the GPUs exist yet,
    so an autoscaler sees the demand and adds GPU nodes. cpu: `cpus_per_worker`, or one CPU per worker
    when the cluster has them, else an equal share so N workers fit a laptop.
    """
    if recipe.device == "cuda":
        return {"CPU": recipe.cpus_per_worker or DEFAULT_GPU_WORKER_CPUS, "GPU": 1.0}
    if recipe.cpus_per_worker is not None:
        return {"CPU": recipe.cpus_per_worker}
    return {"CPU": 1.0 if cluster_cpus >= num_workers else cluster_cpus / num_workers}


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes serves this cluster.

    Autoscaler v2 reports its state to the GCS. Every cluster started by `ray start`/`ray.init` also runs
    the v1 monitor, but without a cluster config its node provider is read-only: it names each node's type
    `node_<node id>` and can launch nothing, so only a status naming other node types counts.
    """
    import json

    import ray
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
        if reply.HasField("autoscaling_state") and reply.autoscaling_state.autoscaler_state_version > 0:
            return True
    except Exception:  # noqa: BLE001 - a GCS without the call: no v2 autoscaler
        pass
    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return False
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _recorded_device(run_dir: str) -> str | None:
    """The `--device` the run's last start in run.json gave (None: it used the recipe's)."""
    store = RunStore(run_dir)
    if not store.exists("run.json"):
        return None
    device = None
    for line in store.read_text("run.json").splitlines():
        if line.strip():
            device = json.loads(line).get("device") or device
    return device


def check_devices(recipe: Recipe, num_workers: int, deadline_s: float = DEVICE_WAIT_S, poll_s: float = 5.0) -> None:
    """Fail in seconds, not never, when the declared GPUs cannot come: none now and no autoscaler to add them;
    with an autoscaler, wait at most `deadline_s` for it to add them, then say what is still missing."""
    import ray

    if recipe.device != "cuda":
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    if have >= num_workers:
        return
    if autoscaler_running():
        console.say(
            f"[sora train] {num_workers} GPU workers asked for, {have:g} GPUs now: waiting up to {deadline_s:.0f}s "
            "for the autoscaler to add nodes"
        )
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            time.sleep(min(poll_s, max(0.0, end - time.monotonic())))
            have = float(ray.cluster_resources().get("GPU", 0))
            if have >= num_workers:
                return
        raise _user_error(
            f"device cuda needs {num_workers} GPUs (one per worker) but after {deadline_s:.0f}s the autoscaler has "
            f"added only {have:g}: {num_workers - have:g} GPU(s) missing (check the cluster's GPU node types and "
            f"max_workers, lower --workers, or wait longer: {DEVICE_WAIT_ENV}=SECONDS)"
        )
    raise _user_error(
        f"device cuda needs {num_workers} GPUs (one per worker) but this cluster has {have:g} and no autoscaler to add "
        "more; run on a GPU cluster, lower --workers, or train with --device cpu"
    )


def _stage_streams(
    recipe: Recipe, stage_data: dict[str, StageData], num_workers: int, start: dict[str, Any] | None, read_cpus: float
) -> dict[str, StageInput]:
    """Per stage still to run: its grid and `StageStream` (the plan its ranks read).

    `start` is the trainer state of the checkpoint the run resumes from (None for a fresh run): the stages
    before the one it stopped in are skipped. The workers build their readers from the stream starting at
    their checkpoint's `consumed_samples` (worker.py, data.py), so nothing consumed is read again, on a
    `--resume` as on a restart inside the run.
    """
    from pipelines.data.load import bucket_files
    from pipelines.train.data import StagePlan, StageStream

    first = start["stage_index"] if start else 0
    stages: dict[str, StageInput] = {}
    groups = num_workers // recipe.sequence_parallel_size  # one reader per sequence-parallel group
    for i, stage in enumerate(recipe.stages):
        sd = stage_data[stage.name]
        if sd.num_clips < stage.micro_batch * groups:
            raise _user_error(
                f"stages[{i}] ({stage.name}): {sd.num_clips} clips in bucket {sd.bucket} are fewer than micro_batch "
                f"{stage.micro_batch} x {groups} data-parallel groups; prepare more clips or lower micro_batch"
            )
        if i < first:
            continue
        shuffle = recipe.data.shuffle == "global"
        if stage.mixed:  # one stream over every bucket's files, each row carrying its grid
            pairs = [(f, part.grid) for part in sd.parts for p in part.paths for f in bucket_files(p, part.bucket)[2]]
            plan = StagePlan.from_files([f for f, _ in pairs], recipe.seed, i, shuffle, grids=[g for _, g in pairs])
        else:
            files = [f for p in sd.paths for f in bucket_files(p, sd.bucket)[2]]
            plan = StagePlan.from_files(files, recipe.seed, i, shuffle)
        budget = stage.tokens_per_batch if stage.mixed else 0
        stream = StageStream(plan, stage.micro_batch, budget, read_cpus, readers=READERS_PER_RANK)
        stages[stage.name] = StageInput(grid=tuple(sd.grid), stream=stream)
    return stages


def latest_checkpoint(store: RunStore, name: str) -> str | None:
    """Run-relative path of the newest checkpoint Ray Train restores (steps only grow).

    Ray Train restores the newest checkpoint its controller registered (listed in its snapshot). A folder
    it never registered, such as one being written when Ctrl-C stopped the run, is not restored, so the
    run does not resume there either: the data streams start where the workers' weights do.
    """
    folder = f"{RAY_RESULTS}/{name}"
    names = [n for n in store.listdir(folder) if n.startswith("checkpoint_") and n[len("checkpoint_") :].isdigit()]
    snapshot = f"{folder}/{RAY_CHECKPOINT_SNAPSHOT}"
    registered = set()
    if store.exists(snapshot):
        registered = {
            r.get("checkpoint_dir_name") for r in json.loads(store.read_text(snapshot)).get("checkpoint_results", [])
        }
    names = [n for n in names if n in registered]
    return f"{folder}/{max(names)}" if names else None


def build_trainer(
    opts: TrainOptions,
    recipe: Recipe,
    stage_data: dict[str, StageData],
    store: RunStore,
    sampler: Any = None,
    start: dict[str, Any] | None = None,
    null_prompt: dict[str, Any] | None = None,
):
    """The TorchTrainer for a run (Ray must be initialised); `start`: the trainer state it resumes from;
    `null_prompt`: the empty prompt's embedding, for models whose dropped captions become it."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.worker import train_loop_per_worker

    num_workers = opts.workers or recipe.workers
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    per_worker = _resources(recipe, num_workers, cluster_cpus)
    # Read tasks take what CPU the workers leave; on a laptop they leave none, and reading Parquet is light.
    spare = cluster_cpus - per_worker["CPU"] * num_workers
    read_cpus = min(MAX_READ_CPUS, spare) if spare >= MIN_READ_CPUS else 0.0
    config = WorkerConfig(
        recipe=recipe,
        run_dir=store.uri,
        stages=_stage_streams(recipe, stage_data, num_workers, start, read_cpus),
        sampler=sampler,
        null_prompt=null_prompt,
        stop_at_step=opts.stop_at_step or 0,
        profile_steps=opts.profile,
        remote_progress=console.active() is not None,  # rank 0's bar drawn by the driver's console
        faults=_fault_injection(),
    )
    env_vars = {"DS_ACCELERATOR": "cpu"} if recipe.device == "cpu" else {}
    fs, path = store.pyarrow_filesystem()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={WORKER_CONFIG_KEY: config},  # Ray Train wants a dict: the one object under one key
        torch_config=TorchConfig(timeout_s=recipe.process_group_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=recipe.device == "cuda", resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=recipe.name,
            storage_path=f"{path}/{RAY_RESULTS}",
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=recipe.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.keep_checkpoints),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )


def _fault_injection() -> FaultInjection:
    """The faults tests ask for through CRASH_ENV and NAN_ENV (`N` or `N:COUNT`); none in a real run."""
    nan_at, _, nan_count = os.environ.get(NAN_ENV, "").partition(":")
    return FaultInjection(
        crash_at_step=int(os.environ.get(CRASH_ENV) or 0),
        nan_at_step=int(nan_at or 0),
        nan_count=int(nan_count or DEFAULT_NAN_COUNT),
    )


def _record_start(opts: TrainOptions, store: RunStore, num_workers: int) -> None:
    if not opts.resume:
        with open(opts.recipe) as f:
            store.write_text("recipe.yaml", f.read())
    history = store.read_text("run.json") if store.exists("run.json") else ""
    args = {
        "recipe": os.path.abspath(opts.recipe),
        "data": [os.path.abspath(d) for d in opts.data],
        "device": opts.device,
        "workers": num_workers,
        "resume": opts.resume,
        "stop_at_step": opts.stop_at_step,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store.write_text("run.json", history + json.dumps(args) + "\n")
    if store.exists(FATAL_FILE):  # a --resume after a diverged attempt: its reason is history now
        store.fs.rm(store._path(FATAL_FILE))


def train(opts: TrainOptions) -> dict[str, Any]:
    """Validate everything that can be checked without Ray, then run the trainer; returns a summary."""
    recipe = load_recipe(opts.recipe)
    check_init(recipe)
    device = opts.device or (_recorded_device(opts.run_dir) if opts.resume else None)
    if device is not None:  # --device, or on --resume the device the run was started (or last resumed) with
        recipe.device = device
    num_workers = _check_options(opts, recipe)
    if not opts.data:
        raise _user_error("--data needs at least one prepared folder")
    stage_data = resolve_stage_data(recipe, opts.data)
    store = _check_run_dir(opts, recipe)
    store.makedirs()

    from pipelines.data.runtime import ensure_ray

    ensure_ray()
    check_devices(recipe, num_workers)
    _record_start(opts, store, num_workers)
    start = None
    ckpt = latest_checkpoint(store, recipe.name) if opts.resume else None
    if ckpt:
        start = json.loads(store.read_text(f"{ckpt}/{TRAINER_STATE}"))
        if make_portable(store, ckpt, num_workers):
            console.say(
                f"[sora train] {ckpt} re-partitioned for {num_workers} workers (DeepSpeed universal checkpoint)"
            )
    sample = recipe.sample
    wants_samples = any(s.sample_prompts for s in recipe.stages)
    sample_cpus = sample.num_cpus if sample.num_cpus is not None else (0.0 if recipe.device == "cpu" else 1.0)
    sampler = start_sampler(store.uri, sample_cpus, sample.num_gpus, recipe.device) if wants_samples else None
    trainer = build_trainer(opts, recipe, stage_data, store, sampler, start, _null_prompt(recipe, stage_data))
    t0 = time.perf_counter()
    try:
        with console.interruptible():  # Ctrl-C: Ray Train aborts the run gracefully, then KeyboardInterrupt here
            result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface the worker's own one-line message
        finish_sampler(sampler, 1)
        raise RuntimeError(_root_message(err)) from err
    samples = finish_sampler(sampler, sample.timeout_s)
    for failure in samples["failed"]:
        console.say(f"[sora train] sample grid not written: {failure}")
    if store.exists(FATAL_FILE):
        fatal = json.loads(store.read_text(FATAL_FILE))
        raise _user_error(fatal["reason"])
    # a LoRA run's: an adapter folder
    done = store.exists("export/config.json") or store.exists("export/adapter_config.json")
    export = store.url("export") if done else None
    return {
        "run_dir": store.url(),
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": dict(result.metrics or {}),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": export,
        "samples": samples["written"],
    }


def _check_options(opts: TrainOptions, recipe: Recipe) -> int:
    """The number of workers, after the checks of the command-line options against the recipe."""
    if opts.workers is not None and opts.workers < 1:
        raise _user_error(f"--workers must be >= 1, got {opts.workers}")
    num_workers = opts.workers or recipe.workers
    if num_workers % recipe.sequence_parallel_size:
        raise _user_error(
            f"sequence_parallel_size {recipe.sequence_parallel_size} must divide the number of workers ({num_workers})"
        )
    if opts.stop_at_step is not None and opts.stop_at_step < 1:
        raise _user_error(f"--stop-at-step must be >= 1, got {opts.stop_at_step}")
    if opts.profile < 0 or opts.profile > recipe.total_steps:
        raise _user_error(
            f"--profile must be between 1 and the recipe's {recipe.total_steps} steps, got {opts.profile}"
        )
    return num_workers


def _null_prompt(recipe: Recipe, stage_data: dict[str, StageData]) -> dict[str, Any] | None:
    """The embedding of "" for `null_text: empty_prompt` models (Wan): what a dropped caption becomes."""
    from pipelines.data.null_prompt import for_training, stage_text_length

    if recipe.model_config().null_text != "empty_prompt":
        return None
    roots = sorted({root for sd in stage_data.values() for root in sd.paths})
    return for_training(recipe.text_encoder, roots, stage_text_length(next(iter(stage_data.values())).info))


def _root_message(err: BaseException) -> str:
    """The innermost worker error of a Ray Train failure, on one line."""
    text = str(err)
    for marker in ("RuntimeError: ", "ValueError: "):
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
    p.add_argument(
        "--run-dir",
        required=True,
        help="run folder or URI (s3://bucket/runs/x): checkpoints, metrics, samples, exports",
    )
    p.add_argument("--workers", type=int, help="Ray Train workers / DeepSpeed ranks (default: the recipe's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where the workers train (default: the recipe's `device`)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument(
        "--stop-at-step", type=int, help="stop with a checkpoint after this global step (continue with --resume)"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="write a torch.profiler trace of N steps (after one warm-up step) to RUN/profile/",
    )
    console.add_arguments(p)
    p.set_defaults(resume_hint="continue with --resume")


def run(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        recipe=args.recipe,
        data=[d for d in args.data.split(",") if d.strip()],
        run_dir=args.run_dir,
        workers=args.workers,
        device=args.device,
        resume=args.resume,
        stop_at_step=args.stop_at_step,
        profile=args.profile,
    )
    console.start_for(args, "sora train")
    summary = train(opts)
    where = summary["export"] or f"{summary['run_dir']} (stopped; continue with --resume)"
    console.say(f"trained in {summary['seconds']}s; {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train.trainer ARGS` is `sora train ARGS` (same parser, same error handling)."""
    from pipelines.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
