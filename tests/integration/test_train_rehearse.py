"""`sora train --rehearse` for every recipe in cluster/recipes/ (a new recipe is covered by the glob): each one's own
settings at tiny size on 2 CPU workers through `sora train`'s path, one lost worker and its restart included. A
recipe that cannot train fails here. One local Ray and one set of synthetic videos for the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "cluster" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rehearse-shapes") / "shapes")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_rehearses(recipe, ray_local, shapes, tmp_path):
    from pipelines.train.recipe import load_recipe
    from pipelines.train.rehearse import rehearse

    line = rehearse(str(recipe), str(tmp_path / "rehearsal"), shapes=shapes)
    print(line)
    assert "\n" not in line and line.startswith(f"rehearsed {recipe.stem} ")
    assert "worker killed after step" in line and "resumed from step" in line
    data = load_recipe(str(tmp_path / "rehearsal" / "recipe.yaml"))
    assert data.device == "cpu" and data.workers == 2
    # The settings are the recipe's own; only sizes shrank.
    import yaml

    source = yaml.safe_load(recipe.read_text())
    assert len(data.stages) == len(source["stages"])
    assert ("bf16" in line.split(";")[0]) == (
        source.get("deepspeed", {}).get("bf16") is True
        or (source.get("deepspeed", {}).get("bf16", "auto") == "auto" and source.get("device") == "cuda")
    )
    assert f"ZeRO-{source.get('deepspeed', {}).get('zero_stage', 3)}" in line
    if source.get("device") == "cuda":
        assert "flash attention" in line.split("not rehearsable on CPU:")[1]
    if source.get("lora"):
        assert "LoRA" in line and "init_from" in line
    if any(s.get("datasets") for s in source["stages"]):
        assert "packing" in line
    export = tmp_path / "rehearsal" / "run" / "export"
    assert (export / "config.json").is_file() or (export / "adapter_config.json").is_file()


def test_rehearse_refuses_flags_it_sets(capsys):
    from pipelines.cli import main

    assert main(["train", "--recipe", str(RECIPES[0]), "--rehearse", "--workers", "4"]) != 0
    err = capsys.readouterr().err
    assert "--rehearse makes its own" in err and "--workers" in err and "Traceback" not in err
