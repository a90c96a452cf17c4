"""Which device a run trains on, and how long it waits for one (issue 27): `--resume` keeps the device the run was
started with, and a cuda run on a cluster whose autoscaler does not bring the GPUs fails after a deadline, in one
line (before: it waited forever once any autoscaler existed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from pipelines.cli import UserError
from pipelines.train.recipe import parse_recipe
from pipelines.train.trainer import _recorded_device, autoscaler_running, check_devices

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_with_autoscaler():
    """A local Ray (no GPU) whose GCS holds what a v1 autoscaler publishes: one node type that is not a plain node."""
    import ray
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    ray.init(num_cpus=1, include_dashboard=False)
    _internal_kv_put(
        DEBUG_AUTOSCALING_STATUS, json.dumps({"autoscaler_report": {"node_type_mapping": {"n1": "gpu_worker"}}})
    )
    yield
    _internal_kv_del(DEBUG_AUTOSCALING_STATUS)
    ray.shutdown()


def test_a_cuda_run_waits_for_the_autoscaler_until_a_deadline(ray_with_autoscaler):
    recipe = parse_recipe(
        {**yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text()), "device": "cuda"}
    )
    assert autoscaler_running()
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        check_devices(recipe, 2, deadline_s=1.0, poll_s=0.2)
    assert 1.0 <= time.monotonic() - t0 < 30
    text = str(err.value)
    assert (
        "device cuda needs 2 GPUs (one per worker) but after 1s the autoscaler has added only 0: 2 GPU(s) missing"
        in text
    )
    assert "SORA_TRAIN_GPU_WAIT_S" in text and "\n" not in text


def test_resume_takes_the_device_of_the_runs_last_start(tmp_path):
    assert _recorded_device(str(tmp_path)) is None  # a new run: the recipe's
    starts = [{"device": "cpu", "resume": False}, {"device": None, "resume": True}]
    (tmp_path / "run.json").write_text("".join(json.dumps(s) + "\n" for s in starts))
    assert _recorded_device(str(tmp_path)) == "cpu"  # `--resume` alone keeps `--device cpu` of the first start
    (tmp_path / "run.json").write_text(
        "".join(json.dumps(s) + "\n" for s in [*starts, {"device": "cuda", "resume": True}])
    )
    assert _recorded_device(str(tmp_path)) == "cuda"  # a later `--resume --device cuda` moved it
