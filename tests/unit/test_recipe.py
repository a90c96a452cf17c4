"""Recipes load into typed dataclasses; every mistake is one line naming the key (no Ray)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.train.engine import lr_at
from pipelines.train.recipe import load_recipe, parse_recipe
from pipelines.train.stage_data import resolve_stage_data
from sora_model.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "cluster" / "recipes"


def smoke() -> dict:
    return yaml.safe_load((RECIPES / "smoke-cpu.yaml").read_text())


@pytest.mark.parametrize("name", ["smoke-cpu", "demo-cpu", "article-5stage", "wan-1.3b-lora"])
def test_shipped_recipes_load(name):
    """Every shipped recipe parses (an `init_from` placeholder path is only checked by `sora train`)."""
    recipe = load_recipe(str(RECIPES / f"{name}.yaml"))
    assert recipe.name == name
    assert recipe.deepspeed.zero_stage == 3
    model = recipe.model_config()
    for stage in recipe.stages:
        assert stage.frames % model.patch_size[0] == 0 and stage.height % model.patch_size[1] == 0
        assert stage.width % model.patch_size[2] == 0
    config = recipe.pipeline_config()
    last = recipe.stages[-1]
    assert (config.sample.num_frames, config.sample.height, config.sample.width) == last.shape


def test_article_recipe_is_the_five_stage_curriculum():
    recipe = load_recipe(str(RECIPES / "article-5stage.yaml"))
    assert len(recipe.stages) == 5
    assert [s.resolution for s in recipe.stages[:4]] == [256, 256, 512, 1024]
    assert recipe.stages[0].frames == 1 and 16 <= recipe.stages[3].frames <= 64
    assert recipe.model_config().gradient_checkpointing and recipe.deepspeed.bf16 in (True, "auto")


def test_article_multimodal_stage_mixes_sizes():
    """The article's last stage trains on images and clips of several sizes at once: a packed mixed-bucket stage."""
    last = load_recipe(str(RECIPES / "article-5stage.yaml")).stages[-1]
    assert last.mixed and len(last.datasets) >= 3
    shapes = {tuple(int(v) for v in b.split("x")) for b in last.datasets}
    assert len({f for f, _, _ in shapes}) >= 2 and len({h for _, h, _ in shapes}) >= 2  # lengths and resolutions mix
    assert any(f == 1 for f, _, _ in shapes) and last.shape in shapes


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["stages"][1].__setitem__("lr", "fast"), "stages[1].lr must be a number"),
        (lambda r: r["stages"][0].__setitem__("stepz", 3), "unknown key 'stages[0].stepz'"),
        (lambda r: r.__setitem__("optimiser", {}), "unknown key 'optimiser'"),
        (lambda r: r["stages"][1]["loss"].__setitem__("motion", 1), "unknown key 'stages[1].loss.motion'"),
        (lambda r: r["stages"][1].__setitem__("steps", 0), "stages[1].steps must be >= 1"),
        (lambda r: r["deepspeed"].__setitem__("zero_stage", 4), "deepspeed.zero_stage must be one of"),
        (lambda r: r["model"]["overrides"].__setitem__("hidden", 8), "unknown key 'model.overrides.hidden'"),
        (lambda r: r["diffusion"].__setitem__("schedule", "cosine"), "diffusion.schedule must be one of"),
        (lambda r: r["stages"][1].__setitem__("name", "images"), "stages[1].name 'images' is used twice"),
        (lambda r: r["stages"][0].__setitem__("resolution", 18), "do not divide by model.patch_size"),
    ],
)
def test_bad_recipe_is_one_line_naming_the_key(edit, message):
    data = copy.deepcopy(smoke())
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _fake_prepared(root: Path, buckets: list[tuple[int, int, int, int]], patch=(1, 4, 4), text_layer=None) -> str:
    root.mkdir(parents=True)
    info = {
        "buckets": [
            {
                "frames": f,
                "height": h,
                "width": w,
                "name": f"{f}x{h}x{w}",
                "path": f"{f}x{h}x{w}",
                "grid": [f // patch[0], h // patch[1], w // patch[2]],
                "num_clips": n,
            }
            for f, h, w, n in buckets
        ],
        "patch_size": list(patch),
        "in_channels": 3,
        "text_encoder": {"name_or_path": "minilm", "dim": 384},
    }
    if text_layer is not None:
        info["text_encoder"]["hidden_layer"] = text_layer
    (root / "dataset.json").write_text(json.dumps(info))
    return str(root)


def test_stage_buckets_are_found_across_data_folders(tmp_path):
    recipe = parse_recipe(smoke())
    images = _fake_prepared(tmp_path / "images", [(1, 16, 16, 24)])
    clips = _fake_prepared(tmp_path / "clips", [(8, 16, 16, 24), (1, 16, 16, 0)])
    found = resolve_stage_data(recipe, [images, clips])
    assert found["images"].paths == [images] and found["clips"].paths == [clips]
    assert found["clips"].grid == (8, 4, 4)


def test_missing_bucket_is_a_clear_error(tmp_path):
    recipe = parse_recipe(smoke())
    clips = _fake_prepared(tmp_path / "clips", [(8, 16, 16, 24)])
    with pytest.raises(
        ConfigError, match=r"stages\[0\].dataset '1x16x16' is not a bucket of the data .*buckets there: 8x16x16"
    ):
        resolve_stage_data(recipe, [clips])


def test_patch_mismatch_is_a_clear_error(tmp_path):
    recipe = parse_recipe(smoke())
    data = _fake_prepared(tmp_path / "d", [(1, 16, 16, 4), (8, 16, 16, 4)], patch=(1, 2, 2))
    with pytest.raises(ConfigError, match="prepared with patch"):
        resolve_stage_data(recipe, [data])


def test_text_layer_mismatch_is_a_clear_error(tmp_path):
    data = smoke()
    data["text_encoder"] = {"hidden_layer": 0}
    recipe = parse_recipe(data)
    buckets = [(1, 16, 16, 4), (8, 16, 16, 4)]
    message = (
        "embedded from text encoder layer -1 but text_encoder.hidden_layer is 0; prepare with --text-hidden-layer 0"
    )
    with pytest.raises(ConfigError, match=message):
        resolve_stage_data(recipe, [_fake_prepared(tmp_path / "old", buckets)])  # written before the option: last layer
    assert resolve_stage_data(recipe, [_fake_prepared(tmp_path / "new", buckets, text_layer=0)])


def test_lr_schedule_warms_up_and_decays_per_stage():
    recipe = parse_recipe(smoke())
    first, second = recipe.stages
    lrs = [lr_at(recipe, s) for s in range(recipe.total_steps)]
    assert lrs[0] == pytest.approx(first.lr / first.warmup_steps * 1)
    assert lrs[first.steps - 1] == pytest.approx(first.lr)  # constant after warm-up
    assert lrs[first.steps] == pytest.approx(second.lr / second.warmup_steps)
    assert lrs[-1] < lrs[first.steps + second.warmup_steps] and lrs[-1] >= second.lr * second.min_lr_ratio


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    data = smoke()
    data["stages"][1]["lr"] = "fast"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "train",
            "--recipe",
            str(bad),
            "--data",
            str(tmp_path),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SORA_DEBUG": "0"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages[1].lr must be a number" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_existing_run_dir_without_resume(tmp_path):
    images = _fake_prepared(tmp_path / "images", [(1, 16, 16, 24)])
    clips = _fake_prepared(tmp_path / "clips", [(8, 16, 16, 24)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n")
    from pipelines.cli import main

    assert (
        main(
            ["train", "--recipe", str(RECIPES / "smoke-cpu.yaml"), "--data", f"{images},{clips}", "--run-dir", str(run)]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "--recipe",
                str(RECIPES / "smoke-cpu.yaml"),
                "--data",
                f"{images},{clips}",
                "--run-dir",
                str(tmp_path / "new"),
                "--resume",
            ]
        )
        == 2
    )


def test_parallelism_fields_are_checked():
    from pipelines.train.recipe import parse_recipe

    base = {
        "name": "r",
        "model": {"preset": "DiT-tiny"},
        "stages": [{"name": "s", "dataset": "8x16x16", "resolution": 16, "frames": 8, "steps": 1, "lr": 1e-3}],
    }
    assert parse_recipe({**base, "sequence_parallel_size": 2}).sequence_parallel_size == 2
    with pytest.raises(ConfigError, match="sequence_parallel_size must be >= 1"):
        parse_recipe({**base, "sequence_parallel_size": 0})
    with pytest.raises(ConfigError, match=r"sequence_parallel_size 4 must divide model.num_heads \(2\)"):
        parse_recipe({**base, "sequence_parallel_size": 4})
    with pytest.raises(ConfigError, match="compile: true needs deepspeed.zero_stage <= 2"):
        parse_recipe({**base, "compile": True})
    assert parse_recipe({**base, "compile": True, "deepspeed": {"zero_stage": 2}}).compile
