"""The trainer with `sequence_parallel_size: 2`: two Ray Train workers (ZeRO-3, gloo) share every clip's tokens.

The loss and gradients of the sequence-parallel model itself are checked against one process in
test_sequence_parallel.py; this checks the trainer's use of it: both ranks train on one micro-batch,
the run finishes every stage and exports a model that loads.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(smoke_data):
    return smoke_data


def test_sequence_parallel_training_runs_every_stage_and_exports(data, tmp_path):
    from pipelines.train.trainer import TrainOptions, train
    from sora_model.pipeline import TextToVideoPipeline

    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    recipe["sequence_parallel_size"] = 2
    for stage in recipe["stages"]:
        stage.update(steps=2, checkpoint_every=0, sample_prompts=[])
    path = tmp_path / "sp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = train(TrainOptions(recipe=str(path), data=data.split(","), run_dir=str(tmp_path / "run"), workers=2))

    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    pipe = TextToVideoPipeline.load(summary["export"])
    assert pipe.model.cfg.num_heads == 2


def test_sequence_parallel_size_must_divide_workers(tmp_path):
    from pipelines.train.trainer import TrainOptions, train

    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    recipe["sequence_parallel_size"] = 2
    path = tmp_path / "sp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(Exception, match="sequence_parallel_size 2 must divide the number of workers \\(3\\)"):
        train(TrainOptions(recipe=str(path), data=["unused"], run_dir=str(tmp_path / "run"), workers=3))


def test_mixed_bucket_stage_trains_on_packed_batches(data, tmp_path):
    """A stage drawing images (16 tokens) and 8-frame clips (128 tokens) at once, packed to 160 tokens per micro-batch
    on two ZeRO-3 workers: the run trains, the stream position counts the rows drawn, and the export samples."""
    import json

    from pipelines.train.trainer import TrainOptions, train

    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    mixed = {
        **recipe["stages"][1],
        "name": "mixed",
        "datasets": ["1x16x16", "8x16x16"],
        "tokens_per_batch": 160,
        "steps": 3,
        "grad_accum": 1,
        "checkpoint_every": 0,
        "sample_prompts": [],
    }
    del mixed["dataset"]
    recipe["stages"] = [mixed]
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = train(TrainOptions(recipe=str(path), data=data.split(","), run_dir=str(tmp_path / "run"), workers=2))

    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["tokens_per_s"]) > 0 for r in rows)
    states = sorted((tmp_path / "run" / "ray_results").glob("*/checkpoint_*/trainer_state.json"))
    consumed = json.loads(states[-1].read_text())["consumed_samples"]
    assert 3 * 2 <= consumed <= 3 * 2 * 10  # 1 to 10 clips per pack, 2 ranks, 3 steps
    assert Path(summary["export"], "model.safetensors").is_file()
