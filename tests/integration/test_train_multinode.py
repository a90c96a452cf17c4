"""A simulated two-node cluster (`ray.cluster_utils.Cluster`, 1 CPU per node): the workers spread over both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import smoke_training_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_spread_over_both_nodes(two_nodes, tmp_path_factory, tmp_path):
    import ray

    from pipelines.train.trainer import TrainOptions, train

    data = smoke_training_data(tmp_path_factory.getbasetemp() / "train-data")
    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    for stage in recipe["stages"]:  # placement is the point here, not training: keep it short
        stage.update(steps=2, checkpoint_every=0, sample_prompts=[])
    path = tmp_path / "two-node.yaml"
    path.write_text(yaml.safe_dump(recipe))

    run = tmp_path / "run"
    summary = train(TrainOptions(recipe=str(path), data=data.split(","), run_dir=str(run), workers=2))
    workers = json.loads((run / "workers.json").read_text())["workers"]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert {w["node_id"] for w in workers} == nodes  # one rank on each node
    assert summary["metrics"]["node_id_rank0"] != summary["metrics"]["node_id_rank1"]
    assert (run / "export" / "model.safetensors").is_file()
