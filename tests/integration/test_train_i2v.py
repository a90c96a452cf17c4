"""Image-to-video fine-tuning on local Ray, from a tiny I2V export in pixel space (the rehearsal's: the I2V recipe's
architecture at width 32, a tiny random CLIP, identity autoencoder, so a clip's first frame can be read back from
its patches):

- `sora data prepare --from-export EXPORT --image-conditioning` writes `image_condition` and `image_features` per
  clip, equal to `sora_model.i2v_condition.image_condition` of the clip's own first frame; without the flag the
  columns are those of a text-to-video run; an interrupted run resumes with the flag and refuses without it;
- `sora train` refuses data without the columns before training, in one line naming the column and the flag;
- a LoRA run of the tiny I2V model on 2 ZeRO-3 CPU workers trains (finite losses, every adapter changed), and its
  merged export samples from an image.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "5x16x20"  # the I2V recipe's 81x480x832 as the rehearsal shrinks it


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from pipelines.train.rehearse import Plan, write_init_export

    folder = tmp_path_factory.mktemp("i2v") / "export"
    data = yaml.safe_load((ROOT / "cluster" / "recipes" / "wan-i2v-14b-lora.yaml").read_text())
    write_init_export(Plan(data, str(folder)), str(folder))
    return folder


def _prepare(shapes: Path, out: Path, export: Path, *flags: str) -> int:
    from pipelines.cli import main

    return main(
        [
            "data",
            "prepare",
            "--manifest",
            str(shapes / "captions.jsonl"),
            "--out",
            str(out),
            "--buckets",
            BUCKET,
            "--from-export",
            str(export),
            "--no-progress",
            *flags,
        ]
    )


@pytest.fixture(scope="module")
def prepared(ray_local, export: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(with --image-conditioning, without it): 6 synthetic clips each."""
    from pipelines.cli import main

    base = tmp_path_factory.mktemp("i2v-data")
    synth = ["data", "synth", "--out", str(base / "shapes"), "--num-videos", "6", "--size", "32", "--frames", "9"]
    assert main([*synth, "--no-progress"]) == 0
    assert _prepare(base / "shapes", base / "cond", export, "--image-conditioning") == 0
    assert _prepare(base / "shapes", base / "plain", export) == 0
    return base / "cond", base / "plain"


def test_prepare_writes_the_condition_columns(prepared, export: Path) -> None:
    from PIL import Image

    from pipelines.data.load import read_prepared
    from pipelines.data.prepare.options import COLUMNS
    from sora_model.autoencoder import build_autoencoder, model_to_pixels
    from sora_model.i2v_condition import image_condition
    from sora_model.image_encoder import ImageEncoder
    from sora_model.patch import unpatchify
    from sora_model.pipeline import load_export_config

    cond, plain = prepared
    info = json.loads((cond / "dataset.json").read_text())
    assert info["columns"][-2:] == ["image_condition", "image_features"] and info["num_clips"] == 6
    image = info["image_conditioning"]
    assert image["images"] == 1 and image["channels"] == 4  # 1 mask + 3 pixel channels
    assert (image["image_tokens"], image["image_dim"]) == (17, 24)
    plain_info = json.loads((plain / "dataset.json").read_text())
    assert plain_info["columns"] == list(COLUMNS) and "image_conditioning" not in plain_info  # no flag: as before

    rows = read_prepared(cond, BUCKET, columns=["patches", "image_condition", "image_features"])
    assert rows["patches"].shape == (6, 400, 12) and rows["image_condition"].shape == (6, 400, 16)
    assert rows["image_features"].shape == (6, 17, 24) and rows["image_features"].dtype == np.float16
    config = load_export_config(str(export))
    encoder_cfg = config.image_encoder
    encoder = ImageEncoder(type(encoder_cfg)(str(export / encoder_cfg.path), str(export / encoder_cfg.processor_path)))
    identity = build_autoencoder(config.autoencoder)
    for i in range(2):  # the stored condition is the shared function's, of the clip's own first frame
        clip = unpatchify(
            torch.from_numpy(rows["patches"][i : i + 1].copy()), (5, 8, 10), (1, 2, 2), 3
        )  # (1, 3, 5, 16, 20)
        first = Image.fromarray(model_to_pixels(clip)[0, 0].numpy())
        expected = image_condition([first], 5, 16, 20, identity, encoder, "cpu")
        got = unpatchify(torch.from_numpy(rows["image_condition"][i : i + 1].copy()), (5, 8, 10), (1, 2, 2), 4)
        assert (got - expected.channels).abs().max().item() <= 1e-6
        assert got[0, 0, 0].eq(1).all() and got[0, 0, 1:].eq(0).all()  # the mask: the first frame given, not the rest
        assert np.abs(rows["image_features"][i].astype(np.float32) - expected.features[0].numpy()).max() <= 1e-2


def test_interrupted_prepare_resumes_with_the_flag_only(prepared, export: Path, tmp_path: Path, capfd) -> None:
    from pipelines.data.load import read_prepared

    cond, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(cond, copy)
    (copy / "dataset.json").unlink()  # interrupted before its end: a shard lost too
    shards = sorted((copy / BUCKET).glob("part-*.parquet"))
    shards[0].unlink()
    shapes = cond.parent / "shapes"
    assert _prepare(shapes, copy, export) != 0
    assert "image_conditioning" in capfd.readouterr().err  # the setting that differs, named
    assert _prepare(shapes, copy, export, "--image-conditioning") == 0
    again = read_prepared(copy, BUCKET, columns=["clip_id", "image_condition"])
    first = read_prepared(cond, BUCKET, columns=["clip_id", "image_condition"])
    order, order2 = np.argsort(again["clip_id"]), np.argsort(first["clip_id"])
    assert np.array_equal(again["clip_id"][order], first["clip_id"][order2])
    assert np.abs(again["image_condition"][order] - first["image_condition"][order2]).max() <= 1e-6


def _recipe(tmp_path: Path, export: Path) -> str:
    recipe = {
        "name": "i2v-tiny-lora",
        "init_from": str(export),
        "lora": {"rank": 4, "alpha": 8, "merge_export": True},
        "deepspeed": {"zero_stage": 3, "param_persistence_threshold": 0},
        "workers": 2,
        "stages": [
            {
                "name": "clips",
                "dataset": BUCKET,
                "frames": 5,
                "height": 16,
                "width": 20,
                "steps": 6,
                "micro_batch": 2,
                "lr": 1e-2,
                "lr_schedule": "constant",
                "loss": {"diffusion": 1.0, "temporal_consistency": 0.0, "motion_smoothness": 0.0},
            }
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_train_refuses_data_without_the_condition(prepared, export: Path, tmp_path: Path, capfd) -> None:
    from pipelines.cli import main

    _, plain = prepared
    args = ["train", "--recipe", _recipe(tmp_path, export), "--data", str(plain), "--run-dir", str(tmp_path / "run")]
    assert main(args) != 0
    err = capfd.readouterr().err
    assert "'image_condition' column" in err and "--image-conditioning" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_lora_finetune_of_an_i2v_model(prepared, export: Path, tmp_path: Path) -> None:
    from PIL import Image

    from pipelines.train.trainer import TrainOptions, train
    from sora_model.lora import read_adapter
    from sora_model.pipeline import TextToVideoPipeline

    cond, _ = prepared
    opts = TrainOptions(recipe=_recipe(tmp_path, export), data=[str(cond)], run_dir=str(tmp_path / "run"), workers=2)
    summary = train(opts)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    print(f"tiny I2V LoRA, 6 steps: losses {[round(v, 4) for v in losses]}")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    out = Path(summary["export"])
    _, pairs = read_adapter(out)
    assert pairs and all(b.abs().max() > 0 for _, b in pairs.values())  # B starts at 0: every adapter learned
    pipe = TextToVideoPipeline.load(str(out / "merged"))  # the merged export keeps the image encoder
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    latents = pipe.sample_latents("a red circle moving left", image=frame, steps=2, num_frames=5, height=16, width=20)
    assert latents.shape == (1, 3, 5, 16, 20) and torch.isfinite(latents).all()
