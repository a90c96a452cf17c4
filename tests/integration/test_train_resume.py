"""A run killed and resumed equals the uninterrupted run: the same loss and learning rate at every step (CPU, fp32).

Two ZeRO-3 workers on the smoke model, five steps over two stages (one with gradient accumulation), run two
ways: uninterrupted; and stopped after step 2, `--resume`d, with the last rank dying after step 5 of the resumed
attempt, which Ray Train restarts from step 4's checkpoint inside the same run. Equality needs what the issue named:
each step's noise seeded by (seed, step, rank, micro-batch), not a per-attempt counter; each rank's micro-batches dealt
from the stage stream by position, not by a shuffle buffer that a restart empties; and a restart reading from the
checkpoint's sample, not replaying the stream. Before those fixes the resumed losses differed from step 3 on.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(smoke_data):
    return smoke_data


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    r = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    r["stages"][0].update(steps=3, checkpoint_every=2, sample_prompts=[])
    r["stages"][1].update(steps=2, checkpoint_every=1, sample_prompts=[])
    path = tmp_path_factory.mktemp("recipe") / "resume.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def train(recipe: str, data: str, run: Path, **kw) -> dict:
    from pipelines.train.trainer import TrainOptions, train

    return train(TrainOptions(recipe=recipe, data=data.split(","), run_dir=str(run), workers=2, **kw))


def curve(run: Path) -> list[float]:
    """step, loss, lr, step, loss, lr, ... of every row of metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) for key in ("step", "loss", "lr")]


@pytest.fixture(scope="module")
def uninterrupted(recipe, data, tmp_path_factory) -> tuple[Path, list[float]]:
    """The reference run; it also records a torch.profiler trace of 2 steps (--profile 2), which changes no loss."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(recipe, data, run, profile=2)
    rows = curve(run)
    assert rows[0::3] == [1, 2, 3, 4, 5]
    return run, rows


def test_stopped_resumed_and_restarted_run_equals_the_uninterrupted_run(
    recipe, data, uninterrupted, tmp_path, monkeypatch
):
    """Stopped after step 2 (mid-stage) and `--resume`d; in the resumed attempt the last rank dies after step 5, and Ray
    Train restarts it inside the run from step 4's checkpoint (mid-stage again: the readers start at its sample)."""
    run = tmp_path / "run"
    train(recipe, data, run, stop_at_step=2)
    assert curve(run) == pytest.approx(uninterrupted[1][:6], rel=1e-6, abs=1e-9)
    monkeypatch.setenv("SORA_TRAIN_CRASH_AT_STEP", "5")
    train(recipe, data, run, resume=True)
    assert (run / ".injected_crash").read_text() == "5"
    assert json.loads((run / "workers.json").read_text())["start"] == "resumed at step 4"
    assert curve(run) == pytest.approx(uninterrupted[1], rel=1e-6, abs=1e-9)


def test_profile_writes_each_ranks_trace_into_the_run_folder(uninterrupted):
    run, _ = uninterrupted
    traces = sorted(p.name for p in (run / "profile").iterdir())
    assert traces == ["rank0-step1.json", "rank1-step1.json"]
    events = json.loads((run / "profile" / traces[0]).read_text())["traceEvents"]
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= {e.get("name") for e in events}
    assert any("DeepSpeedEngine" in str(e.get("name")) or "aten::" in str(e.get("name")) for e in events)
