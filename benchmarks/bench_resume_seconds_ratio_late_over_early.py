"""Seconds from `sora train --resume` to the first new step: stopped at 90% of an epoch ÷ at 10%.

What is compared: the real trainer (`pipelines.train.trainer.train`, 2 workers, DeepSpeed ZeRO-3 on
CPU) on one image stage of DiT-tiny whose epoch is many micro-batches. Two runs are stopped with
`--stop-at-step` (checkpointed) at 10% and at 90% of the first epoch; each is then resumed, and the
time from the resume call to the end of its first new step (the `time` column of metrics.csv) is
measured. The resumes alternate early, late, late, early, ... in one command.

Why: a loader that skips what was consumed by reading it again pays in proportion to the position in
the epoch; the stage stream (`pipelines/train/data.py`) starts reading at the checkpoint's sample, so
the ratio should be ~1 (Ray Train and DeepSpeed start-up dominate both sides).
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import main, median

FIGURE = "resume_seconds_ratio_late_over_early"
GOAL = ("<=", 1.2)
ROOT = Path(__file__).resolve().parents[1]


def _first_step_time(run_dir: Path, step: int) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if int(row["step"]) == step:
                return float(row["time"])
    raise RuntimeError(f"step {step} not in {run_dir}/metrics.csv")


def run(quick: bool) -> dict:
    import ray

    from pipelines.cli import main as sora
    from pipelines.train.trainer import TrainOptions, train

    videos, micro = (800, 4) if quick else (2400, 4)
    rounds = 1 if quick else 2
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # before prepare, which would start its own
    assert (
        sora(
            [
                "data",
                "synth",
                "--out",
                str(work / "shapes"),
                "--num-videos",
                str(videos),
                "--size",
                "16",
                "--frames",
                "1",
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
                str(work / "images"),
                "--resolution",
                "16",
                "--frames",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    epoch_steps = videos // (micro * 2)
    recipe["stages"] = [
        {**recipe["stages"][0], "micro_batch": micro, "steps": epoch_steps, "checkpoint_every": 0, "sample_prompts": []}
    ]
    recipe["ema"]["enabled"] = False
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stops = {"early": max(1, epoch_steps // 10), "late": epoch_steps * 9 // 10}
    seconds: dict[str, list[float]] = {"early": [], "late": []}
    for r in range(rounds):
        for side in ("early", "late") if r % 2 == 0 else ("late", "early"):
            run_dir = work / f"{side}-{r}"
            opts = TrainOptions(recipe=str(path), data=[str(work / "images")], run_dir=str(run_dir), workers=2)
            train(TrainOptions(**{**opts.__dict__, "stop_at_step": stops[side]}))
            t0 = time.time()
            train(TrainOptions(**{**opts.__dict__, "resume": True, "stop_at_step": stops[side] + 1}))
            seconds[side].append(_first_step_time(run_dir, stops[side] + 1) - t0)
    ray.shutdown()
    ratio = median(seconds["late"]) / median(seconds["early"])
    return {
        "value": round(ratio, 3),
        "compared": f"seconds from --resume to the first new step, stopped at step {stops['late']} vs {stops['early']} "
        f"of a {epoch_steps}-step epoch (2 ZeRO-3 CPU workers, DiT-tiny)",
        "details": {
            "late_seconds": seconds["late"],
            "early_seconds": seconds["early"],
            "epoch_steps": epoch_steps,
            "micro_batch": micro,
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
