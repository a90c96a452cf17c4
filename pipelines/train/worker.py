"""The per-worker training loop: one DeepSpeed rank inside a Ray Train worker.

`train_loop_per_worker(config)` is what `TorchTrainer` runs on every worker (see `trainer.py` for how
it is launched). Ray and DeepSpeed are imported inside it, so importing this module stays cheap.

Per rank, per optimizer step:
    shard.iter_torch_batches(micro_batch)  ->  unpatchify to (B, C, T, H, W)  ->  caption dropout
    ->  diffusion.training_losses  ->  all-reduce of (loss terms, non-finite flag)  ->  backward (ZeRO-3
    reduce-scatter)  ->  engine.step at the accumulation boundary  ->  EMA of the local partition
With `sequence_parallel_size` > 1 a group of ranks shares each micro-batch and splits its clips' tokens
(`parallelize.py`, `sequence_parallel.py`); `compile: true` compiles the model once per bucket.

Resumption is exact in what matters: the checkpoint holds every rank's DeepSpeed shard (weights,
AdamW state, LR schedule), the EMA partition, RNG states and the position (stage, step, micro-batches
drawn). Each step's randomness (timesteps, noise, caption dropout) comes from a generator seeded by
(seed, global step, rank, micro-batch), so a resumed step draws the same noise it would have. The
data iterator resumes by skipping the micro-batches already drawn in the current epoch of the stage;
the epoch's shuffle is seeded by (seed, stage, epoch). Ray Data's streaming split does not promise the
same rows per rank across runs, so after a resume a rank may see the same clips in another order;
that changes nothing the tests or users rely on (no step is repeated or skipped).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipelines.train.parallelize import parallelize
from pipelines.train.recipe import Recipe, StageSpec, parse_recipe

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = (
    "step", "stage", "stage_step", "epoch", "loss", "diffusion", "temporal_consistency", "motion_smoothness",
    "perceptual", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "nonfinite_skipped", "time",
)  # fmt: skip
TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"
"""DeepSpeed checkpoint tag: one fixed name, since each Ray checkpoint folder holds exactly one."""
CRASH_MARKER = ".injected_crash"
WORKERS_FILE = "workers.json"
BATCH_COLUMNS = ("patches", "text_tokens", "text_mask", "text_pooled")
SHUFFLE_BUFFER = 64
"""Rows in the local shuffle buffer: clips of a shard arrive in file order otherwise."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, its last checkpoint intact."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


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


def step_seed(seed: int, global_step: int, rank: int, micro: int) -> int:
    """Seed of one micro-batch's randomness; independent of how the run was split into attempts."""
    return (seed * 1_000_003 + global_step * 10_007 + rank * 101 + micro) % (2**63 - 1)


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy batch of prepared rows -> float32/bool tensors (text tokens are stored in fp16).

    Caption columns no row uses are dropped here, on the host, so the model never syncs to find them.
    """
    mask = np.asarray(batch["text_mask"], dtype=bool)
    keep = int(np.flatnonzero(mask.any(0)).max(initial=0)) + 1
    return {
        "patches": torch.as_tensor(np.asarray(batch["patches"], dtype=np.float32)),  # (B, N, P)
        "text_tokens": torch.as_tensor(np.asarray(batch["text_tokens"], dtype=np.float32)[:, :keep]),  # (B, L', Dt)
        "text_mask": torch.as_tensor(mask[:, :keep]),  # (B, L')
        "text_pooled": torch.as_tensor(np.asarray(batch["text_pooled"], dtype=np.float32)),  # (B, Dt)
    }


def stage_batches(shard: Any, stage_index: int, stage: StageSpec, batches_per_epoch: int, consumed: int, seed: int):
    """Endless micro-batches of a stage's shard, epoch after epoch, skipping the first `consumed`.

    Yields (epoch, batch). All ranks draw the same number of batches per epoch (equal split, drop_last),
    which streaming_split needs: a rank that started the next epoch early would wait for the others.
    """
    epoch, skip = divmod(consumed, batches_per_epoch)
    while True:
        it = shard.iter_batches(
            batch_size=stage.micro_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER, stage.micro_batch),
            local_shuffle_seed=seed * 7919 + stage_index * 131 + epoch,
        )
        for batch in it:
            if skip:
                skip -= 1
                continue
            yield epoch, collate(batch)
        epoch += 1


class MetricsLog:
    """RUN/metrics.csv and RUN/tensorboard from rank 0; a resumed run first drops rows past its checkpoint."""

    def __init__(self, run_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(run_dir, METRICS_FILE)
        rows: list[dict[str, str]] = []
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)
        # purge_step drops events a crashed attempt logged past the checkpoint it resumes from.
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        for key in ("loss", "diffusion", "temporal_consistency", "motion_smoothness", "perceptual", "lr", "grad_norm",
                    "samples_per_s", "tokens_per_s"):  # fmt: skip
            value = row[key]
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()


def plot_loss(run_dir: str) -> str | None:
    """RUN/loss.png from metrics.csv (Agg backend: no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, METRICS_FILE)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "diffusion"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, alpha=0.8)
    bounds: dict[str, int] = {}
    for r in rows:
        bounds.setdefault(r["stage"], int(r["step"]))
    for name, s in bounds.items():
        ax.axvline(s, color="grey", lw=0.5)
        ax.text(s, ax.get_ylim()[1], name, fontsize=7, va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# ZeRO-3 aware weight access
# ---------------------------------------------------------------------------------------------


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def local_partition(param: torch.nn.Parameter) -> torch.Tensor:
    """The slice of a parameter this rank holds: its ZeRO-3 partition, or the whole tensor below stage 3."""
    return param.ds_tensor if _is_zero3(param) else param.data


class PartitionEMA:
    """EMA of the weights, kept per rank on its own ZeRO-3 partitions (no extra communication per step).

    Under ZeRO-3 each rank only holds `param.ds_tensor`, a flat 1/world slice; the EMA of that slice is
    all a rank needs to keep. Export swaps the EMA into the partitions and gathers as for the weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: local_partition(p).detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(local_partition(p).detach().float(), 1.0 - self.decay)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in self.shadow.items()}, path)

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path)
        for n, t in self.shadow.items():
            if state[n].shape != t.shape:
                raise ValueError(f"EMA partition of {n} has shape {tuple(state[n].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[n])


def gather_state_dict(module: torch.nn.Module, rank: int, ema: PartitionEMA | None = None) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU state dict on rank 0 (None elsewhere); every rank must call it (ZeRO-3 all-gather).

    With `ema`, the EMA weights are gathered instead: its partitions are swapped into the parameters
    for the gather and the training weights put back afterwards.
    """
    import deepspeed

    params = list(module.parameters())
    zero3 = any(_is_zero3(p) for p in params)
    backup: dict[str, torch.Tensor] = {}
    if ema is not None:
        for n, p in module.named_parameters():
            part = local_partition(p)
            backup[n] = part.detach().clone()
            part.data.copy_(ema.shadow[n].to(part.dtype))
    try:
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
        with ctx:
            state = (
                {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
            )
    finally:
        for n, p in module.named_parameters():
            if n in backup:
                local_partition(p).data.copy_(backup[n])
    return state


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _ds_config(recipe: Recipe, stage: StageSpec, world: int, bf16: bool, use_client_optimizer: bool) -> dict[str, Any]:
    ds = recipe.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.micro_batch * stage.grad_accum * world,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if use_client_optimizer:
        # torch AdamW: DeepSpeed's own CPU Adam is a C++ extension build away on CPU-only machines.
        config["zero_allow_untested_optimizer"] = True
    else:
        # lr 1.0: the LambdaLR schedule returns absolute learning rates.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": 1.0, "betas": list(ds.betas), "weight_decay": ds.weight_decay},
        }
    return config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run (or resume) the recipe's curriculum on this rank; rank 0 writes metrics, samples and the export."""
    use_gpu = bool(config.get("use_gpu")) and torch.cuda.is_available()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from sora_model.diffusion import build_diffusion, load_perceptual_network
    from sora_model.dit import DiT, null_text_drop
    from sora_model.patch import unpatchify

    recipe = parse_recipe(config["recipe"])
    run_dir: str = config["run_dir"]
    stage_info: dict[str, dict[str, Any]] = config["stages"]
    crash_at = int(config.get("crash_at_step") or 0)
    stop_at = int(config.get("stop_at_step") or 0)
    nan_at = int(config.get("nan_at_step") or 0)
    nan_count = int(config.get("nan_count") or 1)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    ds = recipe.deepspeed
    bf16 = ds.bf16 is True or (ds.bf16 == "auto" and use_gpu)

    # 1. Model, optimizer, schedule, engine. Same seed on every rank: identical initial weights, which
    # ZeRO-3 then partitions.
    model_cfg = recipe.model_config()
    torch.manual_seed(recipe.seed)
    model = DiT(model_cfg)
    num_params = model.num_parameters()
    first = recipe.stages[0]
    client_opt = None
    if not use_gpu:
        client_opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=ds.betas, weight_decay=ds.weight_decay)
    ds_config = _ds_config(recipe, first, world, bf16, client_opt is not None)

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(recipe, s))

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=client_opt, model_parameters=None if client_opt else model.parameters(),
        lr_scheduler=make_scheduler, config=ds_config, dist_init_required=False,
    )  # fmt: skip
    module = engine.module
    par = parallelize(engine, recipe, world)  # sequence parallelism and compile, as the recipe asks
    diffusion = build_diffusion(recipe.diffusion)
    ema = PartitionEMA(module, recipe.ema.decay) if recipe.ema.enabled else None

    # 2. Where this rank's parameters live: the partition sizes prove ZeRO-3 sharded them.
    local_numel = sum(local_partition(p).numel() for p in module.parameters())
    node_id = ray.get_runtime_context().get_node_id()
    placement = [None] * world
    dist.all_gather_object(placement, {"rank": rank, "node_id": node_id, "pid": os.getpid(), "partition_numel": local_numel})

    # 3. Resume from the latest checkpoint if Ray Train has one (a restart after a failure, or --resume).
    state = {"stage_index": 0, "stage_step": 0, "global_step": 0, "consumed": 0, "nonfinite_total": 0, "world_size": world}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
                saved = json.load(f)
            if saved["world_size"] != world:
                raise RuntimeError(
                    f"the checkpoint was written by {saved['world_size']} workers but this run has {world}; "
                    f"ZeRO-3 shards are per rank: resume with --workers {saved['world_size']}"
                )
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            if ema is not None:
                ema.load(os.path.join(ckpt_dir, "ema", f"rank{rank}.safetensors"))
            with open(os.path.join(ckpt_dir, "rng", f"rank{rank}.json")) as f:
                set_rng_state(json.load(f))
            state.update(saved)
    start_step = state["global_step"]
    attempt_note = f"resumed at step {start_step}" if checkpoint is not None else "fresh start"

    log = None
    progress = None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, WORKERS_FILE), "w") as f:
            json.dump({"total_numel": num_params, "world_size": world, "zero_stage": ds.zero_stage, "bf16": bf16,
                       "device": str(device), "start": attempt_note, "workers": placement}, f, indent=2)  # fmt: skip
        log = MetricsLog(run_dir, start_step)
        from tqdm import tqdm

        progress = tqdm(total=recipe.total_steps, initial=start_step, desc="train", file=sys.stderr, dynamic_ncols=True)
        print(f"[sora train] {world} workers, ZeRO-{ds.zero_stage}, {'bf16' if bf16 else 'fp32'} on {device}, "
              f"{num_params:,} parameters ({local_numel:,} on rank 0); {attempt_note}", file=sys.stderr, flush=True)  # fmt: skip

    def stats_allreduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def save_checkpoint(stage_index: int, stage_step: int, consumed: int, metrics: dict[str, Any]) -> None:
        """Every rank writes its DeepSpeed shard (+ EMA partition, RNG) and reports; Ray merges the folders."""
        tmp = tempfile.mkdtemp(prefix=f"sora-ckpt-r{rank}-")
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            with open(os.path.join(tmp, "rng", f"rank{rank}.json"), "w") as f:
                json.dump(rng_state(), f)
            if ema is not None:
                os.makedirs(os.path.join(tmp, "ema"), exist_ok=True)
                ema.save(os.path.join(tmp, "ema", f"rank{rank}.safetensors"))
            if rank == 0:
                saved = {"stage_index": stage_index, "stage_step": stage_step, "global_step": state["global_step"],
                         "consumed": consumed, "nonfinite_total": state["nonfinite_total"], "world_size": world,
                         "stage": recipe.stages[stage_index].name}  # fmt: skip
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump(saved, f, indent=2)
            report = {**metrics, "step": state["global_step"], "stage": recipe.stages[stage_index].name,
                      "partition_numel": local_numel, "total_numel": num_params,
                      **{f"partition_numel_rank{p['rank']}": p["partition_numel"] for p in placement},
                      **{f"node_id_rank{p['rank']}": p["node_id"] for p in placement}}  # fmt: skip
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{state['global_step']:07d}",
            )
            # Wait until the controller has registered it: a worker lost right after report() would
            # otherwise take a not-yet-collected checkpoint with it, and the restart would begin earlier.
            ray.train.get_all_reported_checkpoints()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    perceptual_nets: dict[str, torch.nn.Module] = {}
    text_encoder = None
    last_metrics: dict[str, Any] = {}

    # 4. The curriculum.
    for si in range(state["stage_index"], len(recipe.stages)):
        stage = recipe.stages[si]
        resuming_here = si == state["stage_index"]
        k0 = state["stage_step"] if resuming_here else 0
        consumed = state["consumed"] if resuming_here else 0
        if k0 >= stage.steps:
            continue  # finished (and checkpointed) before this attempt began
        info = stage_info[stage.name]
        grid = tuple(info["grid"])
        num_tokens = grid[0] * grid[1] * grid[2]
        batches_per_epoch = info["batches_per_epoch"]
        engine.set_train_micro_batch_size(stage.micro_batch)
        engine.set_train_batch_size(stage.micro_batch * stage.grad_accum * world)
        cond_dropout = recipe.diffusion.cond_dropout if stage.cond_dropout is None else stage.cond_dropout
        perceptual = None
        if stage.loss.perceptual > 0:
            path = stage.loss.perceptual_network
            if path not in perceptual_nets:
                perceptual_nets[path] = load_perceptual_network(path).to(device)
            perceptual = perceptual_nets[path]
        batches = stage_batches(ray.train.get_dataset_shard(stage.name), si, stage, batches_per_epoch, consumed, recipe.seed)
        if progress is not None:
            progress.set_description(f"{stage.name} ({si + 1}/{len(recipe.stages)})")
        bad_in_row = 0
        engine.train()

        for k in range(k0, stage.steps):
            t0 = time.perf_counter()
            sums = np.zeros(5)
            micro = 0
            epoch = 0
            while micro < stage.grad_accum:
                epoch, batch = next(batches)
                batch = par.share(batch)
                consumed += 1
                gen = torch.Generator().manual_seed(step_seed(recipe.seed, state["global_step"], par.dp_rank, consumed))
                x0 = unpatchify(batch["patches"], grid, model_cfg.patch_size, model_cfg.in_channels).to(device)  # (B, C, T, H, W)
                tokens = batch["text_tokens"].to(device)  # (B, L, Dt)
                mask = batch["text_mask"].to(device)  # (B, L)
                pooled = batch["text_pooled"].to(device)  # (B, Dt)
                drop = null_text_drop(x0.shape[0], cond_dropout, gen, device=device)  # (B,)
                dtype = torch.bfloat16 if bf16 else torch.float32

                def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    return par.forward(engine, x_t.to(dtype), t, tokens.to(dtype), mask, pooled.to(dtype), drop).float()  # noqa: B023

                engine.set_gradient_accumulation_boundary(micro == stage.grad_accum - 1)
                terms = diffusion.training_losses(model_fn, x0, stage.loss, generator=gen, num_tokens=num_tokens, perceptual_net=perceptual)
                if nan_at and state["global_step"] + 1 == nan_at and nan_count > 0:
                    nan_count -= 1  # fault injection for tests: this micro-batch's loss is NaN on rank 0
                    if rank == 0:
                        terms["loss"] = terms["loss"] * float("nan")
                values = [float(terms[key]) for key in ("loss", "diffusion", "temporal_consistency", "motion_smoothness", "perceptual")]
                bad = not all(math.isfinite(v) for v in values)
                reduced = stats_allreduce([*(0.0 if bad else v for v in values), float(bad)])
                if reduced[-1] > 0:
                    # Skip on every rank alike: no backward (its reduce-scatter is collective) and nothing reaches
                    # the optimizer; the step goes on with the next micro-batch.
                    del terms, model_fn
                    state["nonfinite_total"] += 1
                    bad_in_row += 1
                    if rank == 0:
                        print(f"[sora train] non-finite loss at step {state['global_step'] + 1} (stage {stage.name}); "
                              f"micro-batch skipped ({bad_in_row} in a row)", file=sys.stderr, flush=True)  # fmt: skip
                    if bad_in_row >= recipe.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{bad_in_row} consecutive non-finite losses in stage '{stage.name}' at step "
                            f"{state['global_step'] + 1}: stopping; the last good checkpoint is intact "
                            "(lower the stage's lr or raise warmup_steps, then --resume)"
                        )
                    continue
                bad_in_row = 0
                sums += np.asarray(reduced[:5]) / world
                engine.backward(terms["loss"] * par.loss_scale)
                engine.step()
                micro += 1

            state["global_step"] += 1
            step_time = time.perf_counter() - t0
            if ema is not None:
                ema.update(module)
            if rank == 0:
                grad_norm = engine.get_global_grad_norm()
                samples = stage.micro_batch * stage.grad_accum * world // par.sp
                mean = sums / stage.grad_accum
                row = {
                    "step": state["global_step"], "stage": stage.name, "stage_step": k + 1, "epoch": epoch,
                    "loss": mean[0], "diffusion": mean[1], "temporal_consistency": mean[2], "motion_smoothness": mean[3],
                    "perceptual": mean[4], "lr": lr_at(recipe, state["global_step"] - 1),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": samples / step_time, "tokens_per_s": samples * num_tokens / step_time,
                    "step_time_s": step_time, "nonfinite_skipped": state["nonfinite_total"], "time": time.time(),
                }  # fmt: skip
                log.log(row)
                progress.update(1)
                progress.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{row['lr']:.2e}")
                last_metrics = {key: row[key] for key in ("loss", "diffusion", "lr", "grad_norm", "samples_per_s", "tokens_per_s")}

            # Fault injection for tests: the last rank dies once at this step (a marker in the run folder
            # makes the restarted attempt go on), as a lost worker or node would.
            if crash_at and state["global_step"] == crash_at and rank == world - 1:
                marker = os.path.join(run_dir, CRASH_MARKER)
                if not os.path.exists(marker):
                    with open(marker, "w") as f:
                        f.write(str(crash_at))
                    print(f"[sora train] injected crash at step {crash_at}", file=sys.stderr, flush=True)
                    os._exit(1)

            stage_end = k + 1 == stage.steps
            stopping = stop_at and state["global_step"] == stop_at and not (stage_end and si == len(recipe.stages) - 1)
            if stage_end and stage.sample_prompts:
                text_encoder = _sample_stage(recipe, stage, module, rank, run_dir, text_encoder)
            if stage_end or stopping or (stage.checkpoint_every and (k + 1) % stage.checkpoint_every == 0):
                save_checkpoint(si, k + 1, consumed, last_metrics)
            if stopping:
                if rank == 0:
                    progress.close()
                    log.close()
                    print(f"[sora train] stopped after step {stop_at} (checkpointed); continue with --resume", file=sys.stderr, flush=True)
                return

    # 5. Export: gather the partitions (every rank takes part), rank 0 writes RUN/export.
    from sora_model.pipeline import save_export

    weights = gather_state_dict(module, rank)
    ema_weights = gather_state_dict(module, rank, ema) if ema is not None else None
    if rank == 0:
        progress.close()
        log.close()
        export_dir = os.path.join(run_dir, "export")
        save_export(export_dir, recipe.pipeline_config(), weights, ema_weights)
        plot_loss(run_dir)
        print(f"[sora train] done: {state['global_step']} steps; export in {export_dir}", file=sys.stderr, flush=True)
    dist.barrier()


def _sample_stage(recipe: Recipe, stage: StageSpec, module: torch.nn.Module, rank: int, run_dir: str, text_encoder):
    """Stage-end samples of the fixed prompts into RUN/samples/<stage>.gif (a grid, one cell per prompt).

    Every rank joins the gather; rank 0 samples with a CPU copy of the full model while the others wait.
    """
    import torch.distributed as dist

    from sora_model.dit import DiT
    from sora_model.pipeline import TextToVideoPipeline
    from sora_model.text import build_text_encoder
    from sora_model.video import make_grid, write_video

    # The training weights, not the EMA: early in a short run the EMA still mostly holds the initial weights.
    state = gather_state_dict(module, rank)
    if rank == 0:
        config = recipe.pipeline_config()
        model = DiT(config.model)
        model.load_state_dict(state)
        if text_encoder is None:
            text_encoder = build_text_encoder(config.text_encoder)
        pipe = TextToVideoPipeline(model, config, text_encoder=text_encoder)
        steps = recipe.sample.steps or recipe.diffusion.num_sampling_steps
        with torch.random.fork_rng():  # sampling must not shift the training RNG streams
            videos = pipe(stage.sample_prompts, num_frames=stage.frames, height=stage.resolution, width=stage.resolution,
                          steps=steps, seed=recipe.sample.seed)  # fmt: skip
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        write_video(os.path.join(run_dir, "samples", f"{stage.name}.gif"), make_grid(videos), fps=recipe.sample.fps)
    dist.barrier()
    return text_encoder
