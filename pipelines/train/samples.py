"""Stage-end sample grids, rendered beside training by a Ray actor so that no rank waits on sampling.

At a stage's end every rank checkpoints, the ranks gather the fp32 weights into `RUN/exports/<stage>/`,
and rank 0 hands that export to the `StageSampler` actor (fire and forget) and goes on training. The
actor, created by the driver before training starts and owned by it, renders the stage's prompts into
`RUN/samples/<stage>.gif` in its own process; the driver waits for what is still queued after training
(up to `sample.timeout_s`). Sampling time therefore never counts against the process group's timeout,
and a restart after a failure never replays it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

SAMPLES_DIR = "samples"
DELAY_ENV = "SORA_SAMPLE_DELAY_S"
"""Fault injection for tests: the sampler sleeps this long before each grid (a slow sampler)."""


class StageSampler:
    """Renders one grid per request from an export in the run folder (local path or URI)."""

    def __init__(self, run_uri: str, device: str = "cpu"):
        from pipelines.train.storage import RunStore

        self.store = RunStore(run_uri)
        self.device = sampler_device(device)
        self.text_encoder = None
        self.written: list[str] = []
        self.failed: list[str] = []

    def ready(self) -> bool:
        return True

    def sample(
        self,
        export_rel: str,
        stage: str,
        prompts: list[str],
        frames: int,
        size: int | tuple[int, int],
        steps: int,
        seed: int,
        fps: int,
    ) -> str | None:
        """`RUN/samples/<stage>.gif` from the export at `export_rel`; returns its path (None if it failed)."""
        try:
            return self._sample(export_rel, stage, prompts, frames, size, steps, seed, fps)
        except Exception as err:  # noqa: BLE001 - a failed grid must never fail the run; it is reported at the end
            self.failed.append(f"{stage}: {type(err).__name__}: {err}")
            print(f"[sora train] sample grid for stage {stage} failed: {err}", file=sys.stderr, flush=True)
            return None

    def _sample(self, export_rel, stage, prompts, frames, size, steps, seed, fps) -> str:
        import torch

        from pipelines.sheets import stage_grid
        from pipelines.train.finetune import adapter_base
        from sora_model.pipeline import TextToVideoPipeline
        from sora_model.video import write_video

        delay = float(os.environ.get(DELAY_ENV) or 0)
        if delay:
            time.sleep(delay)
        tmp = tempfile.mkdtemp(prefix="sora-samples-")
        try:
            export_dir = (
                self.store.download(export_rel, os.path.join(tmp, "export"))
                if self.store.remote
                else self.store.url(export_rel)
            )
            # The training weights, not the EMA: early in a short run the EMA still mostly holds the initial weights.
            # A LoRA run's export is an adapter folder: its base (the run's init_from) with the adapter merged.
            model_dir, lora = adapter_base(export_dir)
            pipe = TextToVideoPipeline.load(
                model_dir, device=self.device, use_ema=False, lora=lora, text_encoder=self.text_encoder
            )
            self.text_encoder = pipe.text_encoder  # loaded once, kept across stages
            height, width = (size, size) if isinstance(size, int) else size
            with torch.random.fork_rng():
                videos = pipe(prompts, num_frames=frames, height=height, width=width, steps=steps, seed=seed)
            local = os.path.join(tmp, f"{stage}.gif")
            write_video(local, stage_grid(videos, prompts), fps=fps)  # each clip under its prompt
            rel = f"{SAMPLES_DIR}/{stage}.gif"
            self.store.upload(local, rel)
            self.written.append(rel)
            return self.store.url(rel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def drain(self) -> dict[str, list[str]]:
        """Called by the driver after training: actor calls run in order, so everything queued is done."""
        return {"written": list(self.written), "failed": list(self.failed)}


def sampler_device(training_device: str, cuda_available: bool | None = None) -> str:
    """Where the actor samples: the training device. A cuda run's actor with no GPU reserved (`sample.num_gpus` 0)
    still sees its node's GPUs (Ray hides GPUs only from tasks it gives some to) and samples beside training there,
    in a fraction of one GPU's memory; CPU only where no GPU is visible at all."""
    import torch

    visible = torch.cuda.is_available() if cuda_available is None else cuda_available
    return "cuda" if training_device == "cuda" and visible else "cpu"


def start_sampler(run_uri: str, num_cpus: float, num_gpus: float, device: str = "cpu") -> Any:
    """The driver's sampler actor, placed and ready before training starts (None when it cannot be placed).

    Placed first so that requests from rank 0 go straight to a live actor: a request queued at a caller
    for an actor still waiting for resources would be lost if that caller exits.
    """
    import ray

    device = "cuda" if num_gpus > 0 else device
    actor = (
        ray.remote(StageSampler)
        .options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1)
        .remote(run_uri, device)
    )
    ready = actor.ready.remote()
    done, _ = ray.wait([ready], timeout=120)
    if not done:
        ray.kill(actor)
        print(
            f"[sora train] no room for the sample actor ({num_cpus} CPU, {num_gpus} GPU): stage-end grids skipped",
            file=sys.stderr,
            flush=True,
        )
        return None
    return actor


def finish_sampler(actor: Any, timeout_s: float) -> dict[str, list[str]]:
    """Wait (bounded) for queued grids, then stop the actor."""
    import ray

    if actor is None:
        return {"written": [], "failed": []}
    try:
        return ray.get(actor.drain.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return {"written": [], "failed": [f"grids still rendering after {timeout_s:.0f}s were abandoned"]}
    finally:
        ray.kill(actor)
