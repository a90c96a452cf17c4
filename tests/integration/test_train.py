"""Ray Train + DeepSpeed ZeRO-3 on CPU through smoke-cpu.yaml: two workers, one local Ray for the module.

The prepared data comes from the real `sora data synth` + `sora data prepare` commands (the contract
between the stages), made once per session and shared with test_train_multinode.py.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "cluster" / "recipes" / "smoke-cpu.yaml")


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(smoke_data):
    return smoke_data


def run_train(data: str, run: Path, **kw):
    from pipelines.train.trainer import TrainOptions, train

    return train(TrainOptions(recipe=SMOKE, data=data.split(","), run_dir=str(run), workers=2, **kw))


def test_smoke_run_survives_a_crash_and_exports(data, tmp_path, monkeypatch):
    """Two ZeRO-3 ranks; the last rank dies after step 6 and the run resumes from step 4's checkpoint."""
    from pipelines.train.recipe import load_recipe

    recipe = load_recipe(SMOKE)
    run = tmp_path / "run"
    monkeypatch.setenv("SORA_TRAIN_CRASH_AT_STEP", "6")
    summary = run_train(data, run)

    # The crash happened once and the restart resumed from the last checkpoint (step 4).
    assert (run / ".injected_crash").read_text() == "6"
    workers = json.loads((run / "workers.json").read_text())
    assert workers["start"] == "resumed at step 4"
    # Steps are contiguous and unique although steps 5-6 ran twice; the final step is the recipe's total.
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, recipe.total_steps + 1))
    assert summary["metrics"]["step"] == recipe.total_steps

    # Each rank holds only its ZeRO-3 partition: about half of the parameters each.
    total = workers["total_numel"]
    parts = [w["partition_numel"] for w in workers["workers"]]
    assert len(parts) == 2 and sum(parts) >= total
    for p in parts:
        assert abs(p - total / 2) <= 0.02 * total, (p, total)
    assert summary["metrics"]["partition_numel_rank0"] == parts[0]

    # The loss falls over the image stage.
    losses = [float(r["loss"]) for r in rows if r["stage"] == "images"]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "diffusion", "temporal_consistency"):
        assert all(r[key] != "" for r in rows)
    assert all(0 < float(r["mfu"]) < 1 for r in rows)  # model FLOPs/s over the workers' (nominal CPU) peak

    # Checkpoints (every rank's DeepSpeed shard), samples, curves, TensorBoard.
    ckpts = sorted((run / "ray_results" / "smoke-cpu").glob("checkpoint_0*"))
    assert ckpts and ckpts[-1].name == f"checkpoint_{recipe.total_steps:07d}"
    shards = sorted(p.name for p in (ckpts[-1] / "ds").iterdir())
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards)
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["global_step"] == recipe.total_steps
    assert (ckpts[-1] / "ema" / "rank1.safetensors").is_file()
    for stage in recipe.stages:
        assert (run / "samples" / f"{stage.name}.gif").stat().st_size > 0
    assert (run / "loss.png").is_file()
    assert any((run / "tensorboard").iterdir())

    # The export loads and generates with the defaults it carries (last stage's clip size).
    from sora_model.pipeline import TextToVideoPipeline

    export = run / "export"
    assert {"model.safetensors", "ema.safetensors", "config.json"} <= set(os.listdir(export))
    config = json.loads((export / "config.json").read_text())
    assert config["sample"]["num_frames"] == 8 and config["sample"]["height"] == 16
    pipe = TextToVideoPipeline.load(str(export))
    video = pipe("a red circle moving left", steps=2)
    assert video.shape == (1, 8, 16, 16, 3) and video.dtype.name == "uint8"


def test_stop_then_resume_continues_exactly(data, tmp_path, monkeypatch):
    """--stop-at-step then --resume: no step repeated or skipped; a NaN loss on the way is skipped and counted."""
    from pipelines.train.recipe import load_recipe

    total = load_recipe(SMOKE).total_steps
    run = tmp_path / "run"
    first = run_train(data, run, stop_at_step=5)
    assert first["export"] is None
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2, 3, 4, 5]

    from pipelines.cli import UserError

    with pytest.raises(UserError, match="--resume"):
        run_train(data, run)

    monkeypatch.setenv("SORA_TRAIN_NAN_AT_STEP", "7")  # one micro-batch of step 7 has a NaN loss on rank 0
    second = run_train(data, run, resume=True)
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    assert json.loads((run / "workers.json").read_text())["start"] == "resumed at step 5"
    skipped = [int(r["nonfinite_skipped"]) for r in rows]
    assert skipped[5] == 0 and skipped[6] == 1 and skipped[-1] == 1
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # no NaN reached the log or the weights
    assert second["export"] and (run / "export" / "model.safetensors").is_file()
