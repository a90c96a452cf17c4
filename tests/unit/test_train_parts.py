"""Training parts that need no Ray: the stage stream's order and resume, the DeepSpeed config, EMA slices."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.train.data import EarlyStream, StagePlan
from pipelines.train.ema import assemble, partition_of
from pipelines.train.engine import ds_config
from pipelines.train.recipe import parse_recipe

ROWS = [5, 3, 7, 4]


def plan(shuffle: bool = True) -> StagePlan:
    return StagePlan(files=[f"f{i}" for i in range(len(ROWS))], rows=list(ROWS), seed=3, stage_index=1, shuffle=shuffle)


def samples(units) -> list[tuple[int, int, int]]:
    """(epoch, file, row) of every sample the units read, in stream order."""
    return [(e, f, r) for e, f, a, b in units for r in range(a, b)]


def test_every_epoch_reads_every_row_once_in_a_new_order():
    p = plan()
    stream = samples(p.units(0, 3 * p.rows_per_epoch))
    for epoch in range(3):
        rows = [(f, r) for e, f, r in stream if e == epoch]
        assert sorted(rows) == sorted((f, r) for f, n in enumerate(ROWS) for r in range(n))
    orders = {tuple(p.order(e)) for e in range(6)}
    assert len(orders) > 1  # files are reshuffled between epochs
    assert plan(shuffle=False).order(4) == list(range(len(ROWS)))


@pytest.mark.parametrize("start", [0, 1, 5, 9, 19, 20, 33])
def test_a_resumed_stream_continues_exactly_where_it_stood(start):
    """Starting at sample s reads what a stream from 0 reads after its first s samples, and nothing before."""
    p = plan()
    whole = samples(p.units(0, 50))
    assert samples(p.units(start, 50 - start)) == whole[start:]


def test_an_early_stream_yields_the_whole_stream_and_raises_what_opening_raised():
    import threading

    opened = threading.Event()

    def open_stream():
        opened.set()
        return iter(range(5))

    early = EarlyStream(open_stream, "s")
    assert opened.wait(5)  # opened in the background, before anyone asks for a batch
    assert list(early.batches()) == [0, 1, 2, 3, 4]
    assert list(EarlyStream(lambda: iter(()), "empty").batches()) == []

    def broken():
        raise KeyError("stage_x")

    with pytest.raises(KeyError, match="stage_x"):
        EarlyStream(broken, "broken").batches()


def test_row_counts_come_from_parquet_footers(tmp_path):
    files = []
    for i, n in enumerate(ROWS):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"x": np.arange(n)}), path)
        files.append(str(path))
    p = StagePlan.from_files(files, seed=0, stage_index=0)
    assert p.rows == ROWS and p.rows_per_epoch == sum(ROWS)


def test_zero3_slices_round_trip_for_any_world_size():
    full = torch.randn(7, 5)
    for world in (1, 2, 3, 4, 8):
        parts = [partition_of(full, r, world) for r in range(world)]
        assert len({p.numel() for p in parts}) == 1  # equal slices, the last one padded
        assert torch.equal(assemble(parts, [7, 5]), full)


def recipe_with(**deepspeed):
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    data["deepspeed"].update(deepspeed)
    return data


def test_deepspeed_settings_reach_the_engine_config():
    r = parse_recipe(
        {
            **recipe_with(
                zero_stage=3,
                hpz_partition_size=8,
                reduce_bucket_size=1000,
                prefetch_bucket_size=2000,
                param_persistence_threshold=30,
                max_live_parameters=4000,
                bf16=True,
                fp32_reduce=True,
                offload_optimizer=True,
            ),
            "device": "cuda",
        }
    )
    cfg = ds_config(r, r.stages[0], world=16)
    z = cfg["zero_optimization"]
    assert z["zero_hpz_partition_size"] == 8 and z["reduce_bucket_size"] == 1000
    assert z["stage3_prefetch_bucket_size"] == 2000 and z["stage3_param_persistence_threshold"] == 30
    assert z["stage3_max_live_parameters"] == 4000 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["communication_data_type"] == "fp32" and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["train_batch_size"] == 4 * 1 * 16

    cpu = parse_recipe(recipe_with(zero_stage=2))
    cfg = ds_config(cpu, cpu.stages[1], world=1)
    assert cfg["bf16"] == {"enabled": False} and "communication_data_type" not in cfg  # bf16 auto is off on cpu
    assert cfg["zero_allow_untested_optimizer"] and "optimizer" not in cfg  # torch AdamW on cpu
    assert "stage3_prefetch_bucket_size" not in cfg["zero_optimization"]

    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(cfg)  # DeepSpeed itself accepts what we build


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hpz_partition_size": 4, "zero_stage": 2}, "hpz_partition_size > 1 needs deepspeed.zero_stage 3"),
        ({"reduce_bucket_size": 0}, "reduce_bucket_size must be >= 1"),
        ({"param_persistence_threshold": -1}, "param_persistence_threshold must be >= 0"),
        ({"gather_per_block": True, "zero_stage": 2}, "gather_per_block needs deepspeed.zero_stage 3"),
    ],
)
def test_bad_deepspeed_settings_are_one_line_errors(change, message):
    from sora_model.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_recipe(recipe_with(**change))


def test_device_is_declared_and_sizes_the_workers():
    from pipelines.train.trainer import _resources

    r = parse_recipe(recipe_with())
    assert r.device == "cpu"
    assert _resources(r, 2, cluster_cpus=2) == {"CPU": 1.0}
    assert _resources(r, 4, cluster_cpus=2) == {"CPU": 0.5}  # a laptop: an equal share
    gpu = parse_recipe({**recipe_with(), "device": "cuda"})
    assert _resources(gpu, 8, cluster_cpus=0) == {"CPU": 8.0, "GPU": 1.0}  # asks even when none exist yet
    assert _resources(parse_recipe({**recipe_with(), "device": "cuda", "cpus_per_worker": 12}), 8, 0)["CPU"] == 12
    from sora_model.config import ConfigError

    with pytest.raises(ConfigError, match="device must be one of 'cpu', 'cuda'"):
        parse_recipe({**recipe_with(), "device": "gpu"})


def test_the_stream_draws_each_clips_captions_reproducibly(tmp_path):
    """A clip with several captions: epochs of the stream pair it with each of them, the same ones on a re-read."""
    from pipelines.data.prepare.captions import EmbedCaptions
    from pipelines.train.data import _ReadSegments, _segments
    from sora_model.config import TextEncoderConfig

    rows = EmbedCaptions(TextEncoderConfig())(
        pa.table({"clip_id": ["a", "c"], "bucket": ["x", "x"], "captions": [["one"], ["one", "four", "five"]]})
    ).drop_columns(["bucket"])
    path = tmp_path / "part-0.parquet"
    pq.write_table(rows, path)
    p = StagePlan.from_files([str(path)], seed=0, stage_index=0, shuffle=False)
    segments = _segments([p.units(0, 2 * 40)])
    read = _ReadSegments(p, segments, ("caption", "text_tokens"))
    out = read({"id": np.arange(len(segments))})
    captions = [str(c) for c in out["caption"]]
    assert set(captions[0::2]) == {"one"} and set(captions[1::2]) == {"one", "four", "five"}
    assert out["text_tokens"].shape == (80, 32, 384) and out["epoch"].tolist() == [e for e in range(40) for _ in (0, 1)]
    again = read({"id": np.arange(len(segments))})
    assert [str(c) for c in again["caption"]] == captions  # seeded by (epoch, file): a resumed run draws the same
