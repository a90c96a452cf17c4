"""Training as it must hold on a GPU cluster, proven on 2 CPU workers with ZeRO-3 (one local Ray for the module).

- the EMA export equals an EMA computed in one process from the same fp32 weight trajectory, every tensor;
- a run stopped with 2 workers resumes with 1 (and 1 -> 2) from exactly the weights it had;
- a diverged run ends once, with a one-line reason, its last checkpoint intact;
- a sampler slower than the process-group timeout does not stop the run;
- `--device cuda` on a cluster that can never have GPUs fails in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, patched_environ, smoke_training_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "cluster" / "recipes" / "smoke-cpu.yaml"


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server (moto) on loopback; its endpoint and keys go in the environment before Ray starts,
    so the workers, the sample actor and the driver all reach it the way they would reach S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems made for an earlier module's server
    try:
        with patched_environ(**env):
            boto3.client("s3").create_bucket(Bucket="runs")
            yield "s3://runs"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    return smoke_training_data(tmp_path_factory.getbasetemp() / "train-data")


def small_recipe(tmp_path: Path, name: str = "small", **changes) -> str:
    """smoke-cpu with short stages and no grids unless asked (the point is the machinery, not the model)."""
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["name"] = name
    for stage in recipe["stages"]:
        stage.update(steps=3, checkpoint_every=1, sample_prompts=[])
    stage_changes = changes.pop("stages", {})
    for stage in recipe["stages"]:
        stage.update(stage_changes)
    for key, value in changes.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(recipe: str, data: str, run_dir: Path | str, **kw):
    from pipelines.train.trainer import TrainOptions, train

    return train(TrainOptions(recipe=recipe, data=data.split(","), run_dir=str(run_dir), **kw))


def checkpoints(run_dir: Path, name: str) -> list[Path]:
    return sorted((run_dir / "ray_results" / name).glob("checkpoint_0*"))


def test_ema_export_is_exact_under_zero3(data, tmp_path):
    """Every tensor of ema.safetensors equals a one-process EMA of the fp32 weights after each step.

    A persistence threshold of 1000 keeps the small tensors (biases, norms, null embeddings) whole on every
    rank, the case DeepSpeed's gather skips, while the matrices are partitioned.
    """
    from safetensors.torch import load_file

    from pipelines.train.checkpoint import fp32_weights
    from pipelines.train.recipe import load_recipe
    from sora_model.dit import DiT

    decay = 0.6
    recipe_path = small_recipe(
        tmp_path,
        "ema",
        ema={"enabled": True, "decay": decay},
        keep_checkpoints=10,
        deepspeed={"param_persistence_threshold": 1000},
        stages={"steps": 2},
    )
    run_dir = tmp_path / "run"
    run(recipe_path, data, run_dir, workers=2)

    recipe = load_recipe(recipe_path)
    torch.manual_seed(recipe.seed)
    ema = {k: v.float().clone() for k, v in DiT(recipe.model_config()).state_dict().items()}  # the initial weights
    ckpts = checkpoints(run_dir, "ema")
    assert len(ckpts) == recipe.total_steps
    for ckpt in ckpts:  # the fp32 master weights after each step, as DeepSpeed saved them
        for k, w in fp32_weights(str(ckpt)).items():
            ema[k].lerp_(w, 1 - decay)
    exported = load_file(str(run_dir / "export" / "ema.safetensors"))
    assert set(exported) == set(ema)
    small = [k for k, v in ema.items() if v.numel() <= 1000]
    assert small and len(small) < len(ema)
    for k, v in ema.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-6, msg=k)
    # The model weights are the fp32 masters of the last step exactly, and each stage left an export.
    last = fp32_weights(str(ckpts[-1]))
    for k, v in load_file(str(run_dir / "export" / "model.safetensors")).items():
        assert torch.equal(v, last[k]), k
    assert {p.name for p in (run_dir / "exports").iterdir()} == {s.name for s in recipe.stages}


def read_steps(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_workers(data, tmp_path, before, after):
    """Stopped mid-stage with `before` workers, resumed with `after`: same weights, same schedule, to the end."""
    from pipelines.train.checkpoint import fp32_weights
    from pipelines.train.engine import lr_at
    from pipelines.train.recipe import load_recipe

    recipe_path = small_recipe(
        tmp_path, f"resume{before}{after}", keep_checkpoints=10, stages={"steps": 3, "micro_batch": 2, "grad_accum": 1}
    )
    recipe = load_recipe(recipe_path)
    run_dir = tmp_path / "run"
    stop = 4  # the second stage's first step: mid-stage
    first = run(recipe_path, data, run_dir, workers=before, stop_at_step=stop)
    assert first["export"] is None
    stopped = checkpoints(run_dir, recipe.name)[-1]
    assert json.loads((stopped / "trainer_state.json").read_text())["world_size"] == before
    at_stop = fp32_weights(str(stopped))

    second = run(recipe_path, data, run_dir, workers=after, resume=True)
    workers = json.loads((run_dir / "workers.json").read_text())
    assert workers["world_size"] == after and workers["start"].startswith(f"resumed at step {stop}")
    assert (stopped / "universal" / "ds").is_dir()  # converted once, beside the checkpoint
    for name, total in workers["weights_digest"].items():  # every tensor the resumed ranks started from
        assert total == pytest.approx(float(at_stop[name].detach().double().sum()), rel=1e-6, abs=1e-6), name
    rows = read_steps(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, recipe.total_steps + 1))
    for r in rows:
        assert float(r["lr"]) == pytest.approx(lr_at(recipe, int(r["step"]) - 1))
    assert second["metrics"]["step"] == recipe.total_steps and second["export"]


def test_a_diverged_run_ends_once_with_its_checkpoint(data, tmp_path, monkeypatch):
    """Non-finite losses past max_nonfinite_steps: one line, the step, no retry, the last checkpoint kept."""
    from pipelines.cli import UserError

    recipe_path = small_recipe(tmp_path, "nan", max_failures=3, max_nonfinite_steps=2)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SORA_TRAIN_NAN_AT_STEP", "3:5")
    with pytest.raises(UserError, match=r"2 consecutive non-finite losses in stage 'images' at step 3: stopped"):
        run(recipe_path, data, run_dir, workers=2)
    assert json.loads((run_dir / "workers.json").read_text())["start"] == "fresh start"  # never retried
    assert [int(r["step"]) for r in read_steps(run_dir)] == [1, 2]
    assert checkpoints(run_dir, "nan")[-1].name == "checkpoint_0000002"
    assert json.loads((run_dir / "fatal.json").read_text())["step"] == 3


def test_a_slow_sampler_never_stops_training(data, tmp_path, monkeypatch):
    """Grids take longer than the process-group timeout; training goes on and the grids still arrive."""
    recipe_path = small_recipe(
        tmp_path,
        "slow",
        process_group_timeout_s=15,
        stages={"steps": 2, "sample_prompts": ["a red circle moving left"]},
    )
    monkeypatch.setenv("SORA_SAMPLE_DELAY_S", "30")
    run_dir = tmp_path / "run"
    summary = run(recipe_path, data, run_dir, workers=2)
    assert summary["export"] and summary["metrics"]["step"] == 4
    assert json.loads((run_dir / "workers.json").read_text())["start"] == "fresh start"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["clips.gif", "images.gif"]


def test_cuda_on_a_cluster_without_gpus_fails_fast(data, tmp_path):
    import time

    from pipelines.cli import main

    t0 = time.time()
    code = main(
        [
            "train",
            "--recipe",
            small_recipe(tmp_path),
            "--data",
            data,
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "cuda",
        ]
    )
    assert code == 2 and time.time() - t0 < 60
    assert not (tmp_path / "run" / "ray_results").exists()  # nothing trained on CPU instead


def test_run_folder_on_object_storage(data, s3, tmp_path):
    """--run-dir s3://...: checkpoints, metrics, grids and exports land in the bucket; `sora export` reads it back."""
    import fsspec
    from safetensors.torch import load_file

    from pipelines.cli import main

    recipe_path = small_recipe(tmp_path, "s3run", stages={"steps": 2}, ema={"enabled": True, "decay": 0.9})
    uri = f"{s3}/smoke"
    summary = run(recipe_path, data, uri, workers=2)
    assert summary["export"] == f"{uri}/export"
    fs, _ = fsspec.core.url_to_fs(uri)
    names = {p.split("/smoke/", 1)[1] for p in fs.find("runs/smoke")}
    for name in (
        "recipe.yaml",
        "run.json",
        "metrics.csv",
        "workers.json",
        "loss.png",
        "export/model.safetensors",
        "export/ema.safetensors",
        "export/config.json",
        "exports/images/model.safetensors",
    ):
        assert name in names, name
    assert any(n.startswith("tensorboard/") for n in names)
    ckpts = sorted({n.split("/")[2] for n in names if n.startswith("ray_results/s3run/checkpoint_0")})
    assert ckpts[-1] == "checkpoint_0000004"
    with fs.open("runs/smoke/metrics.csv") as f:
        assert len(f.read().decode().strip().splitlines()) == 1 + 4

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", f"{uri}/ray_results/s3run/{ckpts[-1]}", "--out", str(out), "--ema"]) == 0
    local = tmp_path / "export-copy"
    fs.get("runs/smoke/export/", str(local) + "/", recursive=True)
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(out / file)), load_file(str(local / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
