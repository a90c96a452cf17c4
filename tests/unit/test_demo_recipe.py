"""The demo's recipe: `--minutes` scales every stage's steps, `--seed` replaces the training seed, and the data is
prepared with the recipe's own patch (no Ray)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")  # pipelines.demo imports Ray lazily; the recipe loader needs only yaml

from pipelines.demo import DEFAULT_MINUTES, FIXED_MINUTES, RECIPE, scaled_recipe  # noqa: E402
from pipelines.train.recipe import load_recipe  # noqa: E402


def test_default_minutes_and_seed_leave_the_recipe_as_written(tmp_path):
    written = load_recipe(str(RECIPE))
    _, recipe = scaled_recipe(RECIPE, DEFAULT_MINUTES, tmp_path)
    assert [s.steps for s in recipe.stages] == [s.steps for s in written.stages]
    assert recipe.seed == written.seed


def test_minutes_scale_the_training_share_and_seed_replaces_the_recipes(tmp_path):
    written = load_recipe(str(RECIPE))
    twice = FIXED_MINUTES + 2 * (DEFAULT_MINUTES - FIXED_MINUTES)  # twice the training minutes: twice the steps
    path, recipe = scaled_recipe(RECIPE, twice, tmp_path, seed=7)
    assert [s.steps for s in recipe.stages] == [2 * s.steps for s in written.stages]
    assert recipe.seed == 7 and "seed 7" in path.read_text().splitlines()[0]
    assert load_recipe(str(path)).seed == 7
