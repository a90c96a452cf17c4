"""Mixed-bucket stages (no Ray): the recipe's checks, the token-budget packer, and the packed loss.

The trainer's use of them (two ZeRO-3 workers drawing packed batches from two buckets) is in
tests/integration/test_train_parallel.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.train.packing import collate_pack, pack_rows
from pipelines.train.recipe import parse_recipe
from pipelines.train.stage_data import resolve_stage_data
from sora_model.config import ConfigError, DiffusionConfig, LossConfig, dit_preset
from sora_model.diffusion import build_diffusion
from sora_model.dit import DiT
from sora_model.patch import patchify, unpatchify

ROOT = Path(__file__).resolve().parents[2]


def mixed_recipe(**stage) -> dict:
    recipe = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    mixed = {
        **recipe["stages"][1],
        "name": "mixed",
        "datasets": ["1x16x16", "8x16x16"],
        "tokens_per_batch": 160,
        **stage,
    }
    del mixed["dataset"]
    recipe["stages"] = [mixed]
    return recipe


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__("dataset", "8x16x16"), "give dataset .* or datasets .*, not both"),
        (lambda s: s.pop("tokens_per_batch"), "tokens_per_batch must be >= 1 for a mixed stage"),
        (lambda s: s.__setitem__("datasets", ["8x16x16", "8x16x16"]), "datasets lists a bucket twice"),
    ],
)
def test_mixed_stage_recipe_errors(edit, message):
    recipe = mixed_recipe()
    edit(recipe["stages"][0])
    with pytest.raises(ConfigError, match=message):
        parse_recipe(recipe)


def test_mixed_stage_refuses_compile_and_sequence_parallelism():
    with pytest.raises(ConfigError, match="change shape every step"):
        parse_recipe({**mixed_recipe(), "compile": True, "deepspeed": {"zero_stage": 2}})
    recipe = mixed_recipe()
    recipe["model"]["overrides"]["num_heads"] = 2
    with pytest.raises(ConfigError, match="sequence_parallel_size 2 cannot shard"):
        parse_recipe({**recipe, "sequence_parallel_size": 2})
    one = copy.deepcopy(mixed_recipe())
    one["stages"][0].update(dataset="8x16x16", datasets=[])
    with pytest.raises(ConfigError, match="tokens_per_batch applies to a mixed stage only"):
        parse_recipe(one)


def _prepared(root: Path, buckets: list[tuple[int, int, int, int]]) -> str:
    root.mkdir(parents=True)
    info = {
        "buckets": [
            {
                "frames": f,
                "height": h,
                "width": w,
                "name": f"{f}x{h}x{w}",
                "path": f"{f}x{h}x{w}",
                "grid": [f, h // 4, w // 4],
                "num_clips": n,
            }
            for f, h, w, n in buckets
        ],
        "patch_size": [1, 4, 4],
        "in_channels": 3,
        "text_encoder": {"name_or_path": "minilm", "dim": 384},
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return str(root)


def test_mixed_stage_resolves_every_bucket_and_checks_the_budget(tmp_path):
    images = _prepared(tmp_path / "images", [(1, 16, 16, 24)])
    clips = _prepared(tmp_path / "clips", [(8, 16, 16, 10)])
    found = resolve_stage_data(parse_recipe(mixed_recipe()), [images, clips])["mixed"]
    assert [p.bucket for p in found.parts] == ["1x16x16", "8x16x16"]
    assert found.num_clips == 34 and found.grid == (8, 4, 4) and found.shape == (8, 16, 16)
    with pytest.raises(
        ConfigError, match=r"tokens_per_batch 100 is below the 128 tokens of one clip of bucket 8x16x16"
    ):
        resolve_stage_data(parse_recipe(mixed_recipe(tokens_per_batch=100)), [images, clips])
    with pytest.raises(ConfigError, match="samples at 4 frames at 16x16, which none of its datasets"):
        resolve_stage_data(parse_recipe(mixed_recipe(frames=4)), [images, clips])


def _row(grid: tuple[int, int, int], i: int, caption_len: int = 3) -> dict:
    n = int(np.prod(grid))
    mask = np.zeros(8, dtype=bool)
    mask[:caption_len] = True
    return {
        "patches": np.full((n, 5), i, np.float32),
        "text_tokens": np.full((8, 4), i, np.float16),
        "text_mask": mask,
        "text_pooled": np.full(4, i, np.float16),
        "grid": np.asarray(grid),
        "epoch": np.int64(0),
    }


def test_packs_fill_the_token_budget_in_stream_order():
    grids = [(1, 4, 4), (8, 4, 4), (1, 4, 4), (1, 4, 4), (8, 4, 4), (8, 4, 4), (1, 4, 4)]  # 16 or 128 tokens
    packs = list(pack_rows([_row(g, i) for i, g in enumerate(grids)], budget=160))
    sizes = [[int(np.prod(r["grid"])) for r in p] for p in packs]
    assert sizes == [[16, 128, 16], [16, 128], [128, 16]]
    assert all(sum(s) <= 160 for s in sizes)
    # nothing dropped or reordered
    assert [int(r["patches"][0, 0]) for p in packs for r in p] == list(range(len(grids)))
    # a clip larger than the budget still travels alone (the recipe check prevents it; the packer never loops)
    assert [len(p) for p in pack_rows([_row((8, 4, 4), 0), _row((8, 4, 4), 1)], budget=100)] == [1, 1]


def test_collated_pack_groups_grids_and_trims_captions():
    pack = [_row((1, 4, 4), 0, 2), _row((8, 4, 4), 1, 5), _row((1, 4, 4), 2, 1)]
    batch = collate_pack(pack, torch.device("cpu"))
    assert batch["grids"] == ((1, 4, 4), (1, 4, 4), (8, 4, 4)) and batch["rows"] == 3
    assert batch["patches"].shape == (16 + 16 + 128, 5)
    assert batch["patches"][:, 0].unique().tolist() == [0.0, 1.0, 2.0]
    assert batch["patches"][32:, 0].eq(1).all()  # the 8-frame clip's tokens come after both images
    assert batch["text_mask"].shape == (3, 5) and batch["text_tokens"].dtype == torch.float16
    assert batch["text_tokens"][:, 0, 0].tolist() == [0.0, 2.0, 1.0]  # captions follow their clips


@pytest.mark.parametrize("schedule", ["rectified_flow", "ddpm_linear"])
def test_packed_loss_is_the_token_weighted_loss_of_each_group(schedule):
    """One packed DiT call over two shapes gives each group the loss a dense call on it gives, and the packed
    total is their token-weighted mean; the random draws are those of two dense calls in a row."""
    torch.manual_seed(0)
    cfg = dit_preset("DiT-tiny", in_channels=3, text_dim=8, patch_size=(1, 4, 4), temporal_windows=(2, 0))
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow = schedule == "rectified_flow"
    diffusion = build_diffusion(
        DiffusionConfig(
            schedule=schedule, prediction="velocity" if flow else "eps", sampler="euler" if flow else "ddim"
        )
    )
    loss_cfg = LossConfig(diffusion=1.0, temporal_consistency=0.1, motion_smoothness=0.05, perceptual=0.0)
    x_img, x_vid = torch.randn(3, 3, 1, 16, 16), torch.randn(2, 3, 4, 8, 8)
    text = [(torch.randn(n, 5, 8), torch.ones(n, 5, dtype=torch.bool), torch.randn(n, 8)) for n in (3, 2)]

    def dense_fn(j):
        return lambda x_t, t: model(x_t, t, *text[j])

    gen = torch.Generator().manual_seed(7)
    dense = [
        diffusion.training_losses(dense_fn(j), x, loss_cfg, generator=gen, num_tokens=n)
        for j, (x, n) in enumerate(((x_img, 16), (x_vid, 16)))
    ]

    grids = ((1, 4, 4),) * 3 + ((4, 2, 2),) * 2
    cat_text = [torch.cat(parts) for parts in zip(*text)]

    def packed_fn(x_ts, t):
        packed = torch.cat([patchify(x, cfg.patch_size).flatten(0, 1) for x in x_ts])
        out = model(packed, t, *cat_text, grids=grids)
        sizes = [3 * 16, 2 * 16]
        return [
            unpatchify(o.reshape(n, -1, o.shape[-1]), g, cfg.patch_size, 3)
            for o, n, g in zip(out.split(sizes), (3, 2), ((1, 4, 4), (4, 2, 2)))
        ]

    packed = diffusion.training_losses_packed(
        packed_fn, [x_img, x_vid], loss_cfg, generator=torch.Generator().manual_seed(7), num_tokens=[16, 16]
    )
    w = x_img.numel() / (x_img.numel() + x_vid.numel())
    for key in ("loss", "diffusion", "temporal_consistency", "motion_smoothness"):
        torch.testing.assert_close(packed[key], w * dense[0][key] + (1 - w) * dense[1][key], atol=1e-5, rtol=1e-5)
    assert packed["temporal_consistency"] > 0  # the video group's terms are really in it
