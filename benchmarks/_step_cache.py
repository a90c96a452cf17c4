"""Shared setup of the two step-cache figures: the trained demo export, its eval prompts and seeds, one sampling pass.

The workload is `sora demo`'s evaluation (pipelines/demo.py): its 32 prompts (24 seen, 8 held-out combinations) x 3
seeds, in batches of 8 as `sora eval` runs them, at the export's defaults (DiT-demo, 8 frames of 32x32, 10 ab2 steps,
CFG 2). Each pass samples every clip from the same seeds, uncached or with a step cache; clips are judged by the
shapes judge (`pipelines/evaluate/attributes.py`), all-correct = colour, shape and direction all right.

The export comes from `SORA_BENCH_DEMO_EXPORT` (default `demo-output/run/export`, where `sora demo` puts it). An
untrained model would say nothing about accuracy, so without a trained export the figures are not measured.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

EXPORT_ENV = "SORA_BENCH_DEMO_EXPORT"
DEFAULT_EXPORT = "demo-output/run/export"
FRAMES_ENV = "SORA_BENCH_FRAMES"
"""Frames per clip (default: the export's); set only when the export was trained on fewer frames than its default."""
BATCH = 8
"""Prompts per `pipeline(...)` call: `sora eval`'s default batch (pipelines/evaluate/run.py, DEFAULT_BATCH)."""
CACHES = {"teacache": None, "fbcache": None}
"""The cached passes: each method at its default threshold (`sora_model.step_cache.DEFAULT_THRESHOLDS`)."""
HEADLINE = "teacache"
"""The method whose numbers are the figures; the other's are in the details."""


def export_dir() -> str | None:
    path = os.environ.get(EXPORT_ENV, DEFAULT_EXPORT)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load() -> tuple[Any, list[dict[str, Any]], list[int], dict[str, Any]]:
    """(pipeline, eval prompts, seeds, sampling settings) on one torch thread (a shared machine's load then lands on
    both sides of the comparison alike)."""
    import torch

    from pipelines.demo import EVAL_SEEDS, eval_prompts
    from sora_model.pipeline import TextToVideoPipeline

    torch.set_num_threads(1)
    path = export_dir()
    assert path is not None
    pipe = TextToVideoPipeline.load(path)
    frames = int(os.environ.get(FRAMES_ENV) or pipe.config.sample.num_frames)
    sampling = {
        "num_frames": frames,
        "steps": pipe.config.diffusion.num_sampling_steps,
        "guidance_scale": pipe.config.diffusion.guidance_scale,
        "sampler": pipe.config.diffusion.sampler,
    }
    return pipe, eval_prompts(), list(range(EVAL_SEEDS)), sampling


def sample_all(
    pipe: Any,
    prompts: list[dict[str, Any]],
    seeds: list[int],
    sampling: dict[str, Any],
    step_cache: str | None = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Every (prompt, seed) clip, (P * S, T, H, W, 3) uint8, and the cache's calls/skipped summed over batches."""
    jobs = [(p["prompt"], sd) for p in prompts for sd in seeds]
    clips, counts = [], {"calls": 0, "skipped": 0}

    def add(stats: Any) -> None:
        counts["calls"] += stats.calls
        counts["skipped"] += stats.skipped

    for i in range(0, len(jobs), BATCH):
        chunk = jobs[i : i + BATCH]
        clips.append(
            pipe(
                [p for p, _ in chunk],
                seed=[sd for _, sd in chunk],
                num_frames=sampling["num_frames"],
                step_cache=step_cache,
                cache_threshold=threshold,
                cache_stats=add,
            )
        )
    return np.concatenate(clips), counts


def accuracy(clips: np.ndarray, prompts: list[dict[str, Any]], seeds: list[int]) -> dict[str, float]:
    """All-correct share (points, 0-100) over all clips, seen and held-out prompts."""
    from pipelines.evaluate.attributes import detect, score

    truths = [p["prompt"] for p in prompts for _ in seeds]
    held = np.array([p["held_out"] for p in prompts for _ in seeds])
    right = np.array([score([detect(c)], [t])["all"] for c, t in zip(clips, truths, strict=True)])
    return {
        "all": round(100 * float(right.mean()), 2),
        "seen": round(100 * float(right[~held].mean()), 2),
        "held_out": round(100 * float(right[held].mean()), 2),
        "clips": len(right),
    }


def not_measured() -> dict[str, Any]:
    return {
        "value": None,
        "compared": {},
        "details": {},
        "note": (
            f"no trained demo export at {os.environ.get(EXPORT_ENV, DEFAULT_EXPORT)} (run `sora demo`, or set "
            f"{EXPORT_ENV})"
        ),
    }


def timed(fn: Any) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0
