"""The per-worker training loop: one DeepSpeed rank inside a Ray Train worker.

`train_loop_per_worker(config)` is what `TorchTrainer` runs on every worker (see `trainer.py` for how it
is launched and for the run folder); `config` holds the one `WorkerConfig` (worker_config.py) the driver built,
the parsed recipe included. It reads like the curriculum:

    restore (checkpoint of any world size) -> for each stage: stream its clips -> steps (step.py)
    -> checkpoints (checkpoint.py) -> at the stage end: checkpoint, export from the fp32 masters (ema.py),
    hand the export to the sample actor (samples.py) -> final export

What only rank 0 does (metrics, progress, exports, workers.json, fatal.json) is `RankZero` (rank_zero.py).

With `sequence_parallel_size` > 1 a group of ranks shares each micro-batch and splits its clips' tokens
(`parallelize.py`, `sequence_parallel.py`); `compile: true` compiles the model once per bucket.

Each step's randomness (timesteps, noise, caption dropout) comes from a generator seeded by (seed,
global step, rank, micro-batch), so a resumed step draws the same noise it would have. The stage's
clips are one stream positioned by a sample count (data.py), so a resume starts reading where the
checkpoint stood, with however many ranks.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch

from pipelines.train.parallelize import parallelize
from pipelines.train.rank_zero import EXPORT_DIR, STAGE_EXPORTS, RankZero, gather_placement, start_rank_zero
from pipelines.train.recipe import Recipe, StageSpec
from pipelines.train.worker_config import WORKER_CONFIG_KEY, WorkerConfig

if TYPE_CHECKING:
    from pipelines.train.data import EarlyStream, StageStream

CRASH_MARKER = ".injected_crash"


def _device(declared: str, local_rank: int) -> torch.device:
    """The declared device; a cuda worker without a visible GPU is an error, never a silent CPU run."""
    if declared == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the recipe declares device cuda but this worker sees no GPU (check the node's drivers and "
                "CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        return device
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def _restore(
    recipe: Recipe, world: int, rank: int, bf16: bool, checkpoint: Any
) -> tuple[Any, torch.nn.Module, Any, dict[str, Any] | None]:
    """(engine, module, EMA, saved position or None): built fresh, then loaded from Ray Train's `checkpoint` if any."""
    from pipelines.train.checkpoint import read_state, restore
    from pipelines.train.ema import PartitionEMA
    from pipelines.train.engine import build_engine

    with ExitStack() as stack:
        ckpt_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint is not None else None
        saved = read_state(ckpt_dir) if ckpt_dir else None
        universal = saved is not None and saved["world_size"] != world
        engine, module = build_engine(recipe, world, load_universal=universal)
        ema = PartitionEMA(module, recipe.ema.decay, bf16, recipe.ema.warmup) if recipe.ema.enabled else None
        if ckpt_dir:
            saved = restore(engine, ema, ckpt_dir, rank, world)
    return engine, module, ema, saved


def _stage_stream(
    recipe: Recipe,
    stream: StageStream,
    stage: StageSpec,
    start_sample: int,
    steps_left: int,
    rank: int,
    world: int,
    device: torch.device,
):
    """This rank's micro-batches of the stage stream from `start_sample` on; None on a rank that does not read.

    One rank per sequence-parallel group reads (its group's share of the stage's micro-batches, `data.py`);
    the group's other ranks receive each micro-batch from it (`parallelize.Parallel.share`). A restart inside a
    run or a `--resume` starts reading at the checkpoint's sample: nothing before it is read again.
    """
    from pipelines.train.data import (
        BATCH_COLUMNS,
        STREAM_SLACK_MICRO,
        device_batches,
        reader_dataset,
        reader_micro_batches,
    )
    from pipelines.train.stage_data import image_columns

    sp = recipe.sequence_parallel_size
    if rank % sp:
        return None
    spec, trim = (
        recipe.data,
        recipe.model_config().text_padding == "masked",
    )  # Wan attends to its caption padding: keep it
    count = steps_left * stage.grad_accum + max(STREAM_SLACK_MICRO, steps_left * stage.grad_accum // 10)
    mbs = reader_micro_batches(stream, start_sample, rank // sp, world // sp, count)
    dataset = reader_dataset(stream, mbs, BATCH_COLUMNS + image_columns(recipe.model_config()))  # + an I2V condition
    if stage.mixed:
        from pipelines.train.packing import packed_batches

        sizes = [sum(b - a for _, _, a, b in mb) for mb in mbs]
        return packed_batches(
            dataset, sizes, spec.prefetch_batches, device, pin=spec.pin_memory and device.type == "cuda", trim_text=trim
        )
    return iter(device_batches(dataset, stage.micro_batch, spec, device, trim_text=trim))


def _export(module: torch.nn.Module, ema: Any, rank: int, bf16: bool) -> tuple[dict | None, dict | None]:
    """Full fp32 weights (and EMA) on rank 0 from the masters; every rank calls it. A LoRA run's: the adapters only."""
    from pipelines.train.ema import gather_full, master_partitions

    masters = master_partitions(module, bf16)
    masters = {
        n: masters[n] for n, p in module.named_parameters() if p.requires_grad
    }  # a frozen base comes from init_from
    weights = gather_full(module, masters, rank)
    ema_weights = gather_full(module, ema.shadow, rank) if ema is not None else None
    return weights, ema_weights


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """Run (or resume) the recipe's curriculum on this rank; rank 0 writes metrics, exports and hands out samples."""
    import torch.distributed as dist

    run = RankRun(config[WORKER_CONFIG_KEY])
    for si in range(run.state["stage_index"], len(run.recipe.stages)):
        if not run.train_stage(si):
            return  # stopped (--stop-at-step) or ended for good (diverged); checkpointed either way
    run.finish()
    dist.barrier()


class RankRun:
    """One rank's run: its engine, EMA and position, and the curriculum stage by stage."""

    def __init__(self, config: WorkerConfig):
        import ray.train

        from sora_model.diffusion import build_diffusion

        ctx = ray.train.get_context()
        self.config = config
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = _device(config.recipe.device, ctx.get_local_rank())
        self.recipe = config.recipe
        self.bf16 = self.recipe.bf16
        self.stop_at = config.stop_at_step
        self.early: dict[int, EarlyStream] = {}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # a fresh start reads stage 0 from its first sample: open it now
            self._open_early(0)
        # 1. Engine, EMA and position: fresh, or from the last checkpoint (a restart, or --resume).
        self.engine, self.module, self.ema, saved = _restore(self.recipe, self.world, self.rank, self.bf16, checkpoint)
        # sequence parallelism and compile, as the recipe asks
        self.par = parallelize(self.engine, self.recipe, self.world, self.device)
        self.diffusion = build_diffusion(self.recipe.diffusion)
        self.state = {"stage_index": 0, "stage_step": 0, "global_step": 0, "consumed_samples": 0, "nonfinite_total": 0}
        if saved is not None:
            self.state.update({k: saved[k] for k in self.state if k in saved})
        note = f"resumed at step {self.state['global_step']}" if saved is not None else "fresh start"
        if saved is not None and saved["world_size"] != self.world:
            note += f" (checkpoint of {saved['world_size']} workers, re-partitioned for {self.world})"
        # 2. Where each rank's parameters live; rank 0 records it (workers.json) and owns the run folder.
        self.placement = gather_placement(self.module, self.rank, self.world, self.bf16)
        self.zero: RankZero | None = start_rank_zero(
            config, self.placement, self.rank, self.device, self.state["global_step"], note
        )
        self.perceptual_nets: dict[str, torch.nn.Module] = {}
        self.last_metrics: dict[str, Any] = {}
        self.final: tuple[dict | None, dict | None] = (None, None)
        self.exported = False
        self.profiler = None
        if config.profile_steps > 0:  # --profile N: this attempt's steps, from its first on
            from pipelines.train.profile import StepProfiler

            self.profiler = StepProfiler(
                config.profile_steps, config.run_dir, self.rank, self.device, self.state["global_step"]
            )

    def checkpoint(self, si: int, stage_step: int, consumed_samples: int) -> None:
        """Every rank writes its shard (+ EMA slices, RNG) and reports; Ray Train merges the folders."""
        import ray.train

        from pipelines.train.checkpoint import write_rank0_files, write_rank_files
        from pipelines.train.finetune import write_checkpoint_info
        from sora_model.config import to_dict

        tmp = tempfile.mkdtemp(prefix=f"sora-ckpt-r{self.rank}-")
        try:
            write_rank_files(tmp, self.engine, self.ema, self.rank)
            stage = self.recipe.stages[si].name
            if self.zero:
                saved = {
                    **self.state,
                    "stage_index": si,
                    "stage_step": stage_step,
                    "consumed_samples": consumed_samples,
                    "world_size": self.world,
                    "stage": stage,
                }
                write_rank0_files(tmp, saved, to_dict(self.recipe.pipeline_config()))
                write_checkpoint_info(tmp, self.recipe)
                self.zero.sync()
            report = {
                **self.last_metrics,
                "step": self.state["global_step"],
                "stage": stage,
                **self.placement.report_fields(),
            }
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{self.state['global_step']:07d}",
            )
            # Wait until the controller has registered it: a worker lost right after report() would
            # otherwise take a not-yet-collected checkpoint with it, and the restart would begin earlier.
            ray.train.get_all_reported_checkpoints()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _stepper(self, stage: StageSpec) -> Any:
        from pipelines.train.step import Stepper
        from sora_model.diffusion import load_perceptual_network

        perceptual = None
        if stage.loss.perceptual > 0:
            path = stage.loss.perceptual_network
            if path not in self.perceptual_nets:
                self.perceptual_nets[path] = load_perceptual_network(path).to(self.device)
            perceptual = self.perceptual_nets[path]
        faults = self.config.faults
        return Stepper(
            self.recipe,
            stage,
            self.engine,
            self.diffusion,
            self.config.stages[stage.name].grid,
            self.rank,
            self.world,
            self.device,
            perceptual,
            par=self.par,
            nan_at=faults.nan_at_step,
            nan_count=faults.nan_count,
            null_prompt=self.config.null_prompt,
        )

    def train_stage(self, si: int) -> bool:
        """Steps of stage `si` from where the run stands; False when the run stops here."""
        stage = self.recipe.stages[si]
        here = si == self.state["stage_index"]
        k0 = self.state["stage_step"] if here else 0
        start_sample = self.state["consumed_samples"] if here else 0
        if k0 >= stage.steps:
            return True  # finished (and checkpointed) before this attempt began
        self.engine.set_train_micro_batch_size(stage.micro_batch)
        self.engine.set_train_batch_size(stage.micro_batch * stage.grad_accum * self.world)
        stepper = self._stepper(stage)
        early = self.early.pop(si, None)
        batches = early.batches() if early else self._stream(stage, start_sample, stage.steps - k0)
        consumed = start_sample
        if self.zero:
            self.zero.progress.set_description(f"{stage.name} ({si + 1}/{len(self.recipe.stages)})")
        self.engine.train()
        for k in range(k0, stage.steps):
            t0 = time.perf_counter()
            result = stepper.run(batches, self.state["global_step"])
            self.state["nonfinite_total"] += result.skipped
            if result.fatal:
                self._end_for_good(result.fatal)
                self._close_profiler()
                return False
            self.state["global_step"] += 1
            if self.profiler is not None:
                self.profiler.step()
            if self.ema is not None:
                self.ema.update(self.module, self.state["global_step"])
            consumed += result.rows
            self._record(stage, k, result, time.perf_counter() - t0)
            if k == k0 and si + 1 < len(self.recipe.stages):
                self._open_early(si + 1)  # once this stage's stream runs; the next one starts from its first sample
            _maybe_crash(
                self.config.faults.crash_at_step, self.state["global_step"], self.rank, self.world, self.config.run_dir
            )
            if not self._after_step(si, k, consumed):
                self._close_profiler()
                return False
        return True

    def _close_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.close()

    def _open_early(self, si: int) -> None:
        """Open stage `si`'s stream from its first sample in the background (`EarlyStream`): its start-up
        overlaps the engine build or the stage before instead of stalling the stage's first step."""
        from pipelines.train.data import EarlyStream

        stage = self.recipe.stages[si]
        if self.rank % self.recipe.sequence_parallel_size:
            return  # not this sequence-parallel group's reader
        self.early[si] = EarlyStream(lambda: self._stream(stage, 0, stage.steps), stage.name)

    def _stream(self, stage: StageSpec, start_sample: int, steps_left: int):
        """This rank's micro-batches of `stage` from `start_sample` on (`_stage_stream`)."""
        stream = self.config.stages[stage.name].stream
        return _stage_stream(self.recipe, stream, stage, start_sample, steps_left, self.rank, self.world, self.device)

    def _record(self, stage: StageSpec, k: int, result: Any, step_time: float) -> None:
        """Rank 0: one metrics row, the progress bar, and a line when micro-batches were skipped."""
        from pipelines.train.engine import lr_at

        if not self.zero:
            return
        step = self.state["global_step"]
        if result.skipped:
            print(
                f"[sora train] non-finite loss at step {step} (stage {stage.name}); {result.skipped} micro-batch(es) "
                "skipped",
                file=sys.stderr,
                flush=True,
            )
        grad_norm = self.engine.get_global_grad_norm()
        m = result.means
        row = {
            "step": step,
            "stage": stage.name,
            "stage_step": k + 1,
            "epoch": result.epoch,
            "loss": m[0],
            "diffusion": m[1],
            "temporal_consistency": m[2],
            "motion_smoothness": m[3],
            "perceptual": m[4],
            "lr": lr_at(self.recipe, step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": result.clips / step_time,
            "tokens_per_s": result.tokens / step_time,
            "mfu": self._mfu(stage, result.tokens / step_time),
            "step_time_s": step_time,
            "nonfinite_skipped": self.state["nonfinite_total"],
            "time": time.time(),
        }
        self.zero.log.log(row)
        self.zero.progress.update(1)
        self.zero.progress.set_postfix(loss=f"{m[0]:.4f}", lr=f"{row['lr']:.2e}")
        self.last_metrics = {
            key: row[key] for key in ("loss", "diffusion", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu")
        }

    def _mfu(self, stage: StageSpec, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: the step's model FLOPs per second over every worker's peak (metrics.py)."""
        from pipelines.train.metrics import peak_tflops, train_flops_per_token

        grid = self.config.stages[stage.name].grid
        per_token = train_flops_per_token(
            self.recipe.model_config(), grid[0] * grid[1] * grid[2], self.recipe.text_encoder.max_length
        )
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        peak = peak_tflops(name, self.bf16, self.recipe.peak_tflops) * 1e12 * self.world
        return tokens_per_s * per_token / peak

    def _after_step(self, si: int, k: int, consumed_samples: int) -> bool:
        """Checkpoint, stage-end export and samples; False when --stop-at-step stops the run here."""
        stage = self.recipe.stages[si]
        step = self.state["global_step"]
        stage_end = k + 1 == stage.steps
        last = stage_end and si == len(self.recipe.stages) - 1
        stopping = bool(self.stop_at and step == self.stop_at and not last)
        # Checkpoint first: whatever follows (exports, samples) may fail without losing the step.
        if stage_end or stopping or (stage.checkpoint_every and (k + 1) % stage.checkpoint_every == 0):
            self.checkpoint(si, k + 1, consumed_samples)
        if stage_end:
            self._stage_export(stage)
        if stopping and self.zero:
            print(
                f"[sora train] stopped after step {step} (checkpointed); continue with --resume",
                file=sys.stderr,
                flush=True,
            )
            self.zero.close()
        return not stopping

    def _stage_export(self, stage: StageSpec) -> None:
        """RUN/exports/<stage> from the fp32 masters (every rank gathers), then the sample actor takes it over."""
        self.final, self.exported = _export(self.module, self.ema, self.rank, self.bf16), True
        sampler = self.config.sampler
        if not self.zero:
            return
        rel = f"{STAGE_EXPORTS}/{stage.name}"
        self.zero.write_export(rel, *self.final)
        if stage.sample_prompts and sampler is not None:
            r = self.recipe
            sampler.sample.remote(
                rel,
                stage.name,
                list(stage.sample_prompts),
                stage.frames,
                (stage.height, stage.width),
                r.sample.steps or r.diffusion.num_sampling_steps,
                r.sample.seed,
                r.sample.fps,
            )

    def _end_for_good(self, reason: str) -> None:
        """A diverged run: every rank stops together (the decision was all-reduced); rank 0 says why."""
        if self.zero:
            print(f"[sora train] {reason}", file=sys.stderr, flush=True)
            self.zero.write_fatal(reason, self.state["global_step"] + 1)
            self.zero.close()

    def finish(self) -> None:
        """The final export: the last stage's, gathered at its end (or now, if it ended in an earlier attempt)."""
        self._close_profiler()
        if not self.exported:
            self.final = _export(self.module, self.ema, self.rank, self.bf16)
        if self.zero:
            self.zero.write_export(EXPORT_DIR, *self.final)
            where = self.zero.mirror.store.url(EXPORT_DIR)
            print(
                f"[sora train] done: {self.state['global_step']} steps; export in {where}", file=sys.stderr, flush=True
            )
            self.zero.close(plot=True)


def _maybe_crash(crash_at: int, step: int, rank: int, world: int, run_uri: str) -> None:
    """Fault injection for tests: the last rank dies once at this step, as a lost worker or node would.

    A marker in the run folder makes the restarted attempt go on.
    """
    if not crash_at or step != crash_at or rank != world - 1:
        return
    from pipelines.train.storage import RunStore

    store = RunStore(run_uri)
    if store.exists(CRASH_MARKER):
        return
    store.write_text(CRASH_MARKER, str(crash_at))
    print(f"[sora train] injected crash at step {crash_at}", file=sys.stderr, flush=True)
    os._exit(1)
