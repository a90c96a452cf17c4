"""What only rank 0 does in a training run, and the record of where every rank's parameters live.

Every rank calls `gather_placement` when an attempt starts (it is collective: one all-gather, one all-reduce);
`start_rank_zero` then gives rank 0 its `RankZero` and the other ranks None. `RankZero` owns the run folder's
files a worker writes, through a local mirror (storage.py):

    RUN/workers.json           rank -> node id, ZeRO-3 partition size, digest of the start weights
    RUN/metrics.csv, tensorboard/, loss.png   metrics.py, one row per optimizer step
    RUN/exports/<stage>/, RUN/export/         the stage exports and the final one (what `sora serve` loads)
    RUN/fatal.json             why the run ended for good (the driver reads and reports it)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.train.recipe import Recipe
from pipelines.train.worker_config import WorkerConfig

WORKERS_FILE = "workers.json"
FATAL_FILE = "fatal.json"
"""Written by rank 0 when the run ends for a reason a retry cannot fix (the driver reads and reports it)."""
EXPORT_DIR = "export"
STAGE_EXPORTS = "exports"


@dataclass(frozen=True)
class Placement:
    """Where each rank's parameters live (the partition sizes prove ZeRO-3 sharded them)."""

    local_numel: int
    """Elements of this rank's partition of the parameters."""
    total_numel: int
    """Elements of the whole model."""
    workers: list[dict[str, Any]]
    """Per rank: rank, node_id, pid, partition_numel."""
    digest: dict[str, float]
    """The start weights' digest (ema.weights_digest)."""

    def report_fields(self) -> dict[str, Any]:
        """What each checkpoint report carries about the placement (the tests read it from Ray Train's result)."""
        return {
            "partition_numel": self.local_numel,
            "total_numel": self.total_numel,
            **{f"partition_numel_rank{p['rank']}": p["partition_numel"] for p in self.workers},
            **{f"node_id_rank{p['rank']}": p["node_id"] for p in self.workers},
        }


def gather_placement(module: torch.nn.Module, rank: int, world: int, bf16: bool) -> Placement:
    """Every rank's partition size and node, gathered on every rank, and the start weights' digest (collective)."""
    import ray
    import torch.distributed as dist

    from pipelines.train.ema import is_zero3, weights_digest

    params = list(module.parameters())
    local_numel = sum((p.ds_tensor if is_zero3(p) else p).numel() for p in params)
    total_numel = sum(int(p.ds_numel) if is_zero3(p) else p.numel() for p in params)
    workers: list[Any] = [None] * world
    me = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "partition_numel": local_numel,
    }
    dist.all_gather_object(workers, me)
    return Placement(local_numel, total_numel, workers, weights_digest(module, bf16))


def start_rank_zero(
    config: WorkerConfig, placement: Placement, rank: int, device: torch.device, start_step: int, note: str
) -> RankZero | None:
    """Rank 0: a line saying how the run is laid out, workers.json, and its `RankZero`; None on other ranks."""
    if rank != 0:
        return None
    r = config.recipe
    world = len(placement.workers)
    info = {
        "total_numel": placement.total_numel,
        "world_size": world,
        "zero_stage": r.deepspeed.zero_stage,
        "bf16": r.bf16,
        "device": str(device),
        "start": note,
        "workers": placement.workers,
        "weights_digest": placement.digest,
    }
    print(
        f"[sora train] {world} workers, ZeRO-{r.deepspeed.zero_stage}, {'bf16' if r.bf16 else 'fp32'} on "
        f"{r.device}, {placement.total_numel:,} parameters ({placement.local_numel:,} on rank 0); {note}",
        file=sys.stderr,
        flush=True,
    )
    return RankZero(config.run_dir, r, start_step, info, config.remote_progress)


class RankZero:
    """What only rank 0 does: metrics, progress, exports, run-folder sync (through a local mirror)."""

    def __init__(
        self, run_uri: str, recipe: Recipe, start_step: int, workers_info: dict[str, Any], remote_progress: bool = False
    ):
        from tqdm import tqdm

        from pipelines.console import RemoteProgress
        from pipelines.train.metrics import METRICS_FILE, MetricsLog
        from pipelines.train.storage import LocalMirror, RunStore

        self.recipe = recipe
        self.mirror = LocalMirror(RunStore(run_uri))
        self.mirror.fetch(METRICS_FILE)
        with open(self.mirror.path(WORKERS_FILE), "w") as f:
            json.dump(workers_info, f, indent=2)
        self.log = MetricsLog(self.mirror.root, start_step)
        self.progress = (
            RemoteProgress(recipe.total_steps, start_step, desc="train")
            if remote_progress
            # the driver draws it
            else tqdm(total=recipe.total_steps, initial=start_step, desc="train", file=sys.stderr, dynamic_ncols=True)
        )
        self.sync()

    def sync(self) -> None:
        from pipelines.train.metrics import METRICS_FILE, TENSORBOARD_DIR

        self.log.flush()
        self.mirror.sync(WORKERS_FILE, METRICS_FILE, TENSORBOARD_DIR)

    def write_export(
        self, rel: str, weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor] | None
    ) -> None:
        from pipelines.train.finetune import write_lora_export
        from sora_model.pipeline import save_export

        if self.recipe.lora is not None:  # the adapters (+ ema/, merged/): the base is init_from, unchanged
            write_lora_export(self.mirror.path(rel), self.recipe, weights, ema_weights)
        else:
            save_export(self.mirror.path(rel), self.recipe.pipeline_config(), weights, ema_weights)
        self.mirror.sync(rel)

    def write_fatal(self, message: str, step: int) -> None:
        with open(self.mirror.path(FATAL_FILE), "w") as f:
            json.dump({"reason": message, "step": step}, f)
        self.mirror.sync(FATAL_FILE)

    def close(self, plot: bool = False) -> None:
        from pipelines.train.metrics import LOSS_PLOT, plot_loss

        self.progress.close()
        self.log.close()
        if plot:
            plot_loss(self.mirror.root)
        self.sync()
        self.mirror.sync(LOSS_PLOT)
        self.mirror.close()
