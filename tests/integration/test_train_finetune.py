"""Fine-tuning a converted Wan2.1 on Ray Train + DeepSpeed ZeRO-3 (2 CPU workers), on data prepared with the
model's own parts: a tiny random WanPipeline folder (made here, nothing downloaded) -> `sora convert` ->
`sora data prepare --from-export` (Wan VAE latents, umT5 tokens, the empty prompt's embedding) -> `sora train`.

- LoRA through two stages with gradient checkpointing, EMA and a stop + resume: the loss on a fixed batch falls,
  only adapters changed (the merged export's other weights are init_from's, bit for bit; adapted ones are
  base + alpha/r B @ A), and `sora export --merge-lora` of the last checkpoint equals the run's merged export;
- a full fine-tune from init_from starts from the export's weights (digest) and changes them.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from helpers import make_tiny_wan_folder  # noqa: E402

pytestmark = pytest.mark.slow

LORA_RANK, LORA_ALPHA = 4, 8


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from pipelines.cli import main

    folder = make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")
    out = tmp_path_factory.mktemp("export") / "wan-tiny"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def data(ray_local, export: Path, tmp_path_factory) -> Path:
    """12 synthetic clips prepared with the tiny Wan VAE and umT5: 5 frames (1 + 4) at 32x32."""
    from pipelines.cli import main

    base = tmp_path_factory.mktemp("wan-data")
    synth = ["data", "synth", "--out", str(base / "shapes"), "--num-videos", "12", "--size", "32", "--frames", "9"]
    assert main([*synth, "--no-progress"]) == 0
    t0 = time.perf_counter()
    prepare = [
        "data",
        "prepare",
        "--manifest",
        str(base / "shapes" / "captions.jsonl"),
        "--out",
        str(base / "prepared"),
        "--resolution",
        "32",
        "--frames",
        "5",
        "--from-export",
        str(export),
        "--no-progress",
    ]
    assert main(prepare) == 0
    print(f"prepare with the Wan VAE + umT5: {time.perf_counter() - t0:.1f}s")
    return base / "prepared"


def test_prepare_with_wan_vae_and_umt5(data: Path, export: Path) -> None:
    from pipelines.data.load import read_prepared
    from pipelines.data.null_prompt import read_null_prompt
    from sora_model.pipeline import load_export_config

    info = json.loads((data / "dataset.json").read_text())
    assert info["in_channels"] == 4 and info["patch_size"] == [1, 2, 2] and info["autoencoder"]["kind"] == "diffusers"
    assert info["text_encoder"]["max_length"] == 512 and info["text_encoder"]["dim"] == 16
    grids = {b["name"]: b["grid"] for b in info["buckets"]}
    assert grids == {"5x32x32": [2, 2, 2]}  # 8x spatial; 1 + 4k frames -> 1 + k latent frames
    rows = read_prepared(data, "5x32x32", columns=["patches", "text_mask"])
    assert rows["patches"].shape == (12, 8, 16) and rows["text_mask"].shape == (12, 512)
    null = read_null_prompt(str(data), load_export_config(str(export)).text_encoder)
    assert null is not None and null["tokens"].shape == (512, 16)


def _recipe(tmp_path: Path, export: Path, **extra) -> str:
    stage = {
        "resolution": 32,
        "micro_batch": 3,
        "lr": 1e-2,
        "warmup_steps": 1,
        "lr_schedule": "constant",
        "loss": {"diffusion": 1.0, "temporal_consistency": 0.0, "motion_smoothness": 0.0},
    }
    recipe = {
        "name": "wan-tiny-ft",
        "init_from": str(export),
        "model": {"overrides": {"gradient_checkpointing": True}},
        "deepspeed": {"zero_stage": 3, "param_persistence_threshold": 0},  # every tensor partitioned, even the adapters
        "ema": {"enabled": True, "decay": 0.9},
        "workers": 2,
        "stages": [
            {**stage, "name": "warm", "dataset": "5x32x32", "frames": 5, "steps": 6},
            {
                **stage,
                "name": "clips",
                "dataset": "5x32x32",
                "frames": 5,
                "steps": 18,
                "checkpoint_every": 9,
                "lr": 5e-3,
            },
        ],
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _train(recipe: str, data: Path, run: Path, **kw) -> dict:
    from pipelines.train.trainer import TrainOptions, train

    return train(TrainOptions(recipe=recipe, data=[str(data)], run_dir=str(run), workers=2, **kw))


@torch.no_grad()
def fixed_batch_loss(export_dir: str, data: Path, lora: str | None = None) -> float:
    """Flow-matching loss of the 5-frame clips at 8 fixed timesteps each, with fixed noise: the same numbers for
    any weights, so before/after compares the models, not the draws."""
    from pipelines.data.load import read_prepared
    from sora_model.config import LossConfig
    from sora_model.patch import unpatchify
    from sora_model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.load(export_dir, use_ema=False, lora=lora)
    cfg = pipe.config.model
    rows = read_prepared(data, "5x32x32", columns=["patches", "text_tokens", "text_mask", "text_pooled"])
    x0 = unpatchify(
        torch.tensor(rows["patches"]).float(), (2, 2, 2), cfg.patch_size, cfg.in_channels
    )  # (B, C, T, H, W)
    tokens, mask, pooled = (torch.tensor(rows[k]).float() for k in ("text_tokens", "text_mask", "text_pooled"))
    losses = []
    for k in range(8):
        gen = torch.Generator().manual_seed(k)

        def model_fn(x, t):
            return pipe.model(x, t, tokens, mask, pooled)

        terms = pipe.diffusion.training_losses(
            model_fn, x0, LossConfig(temporal_consistency=0, motion_smoothness=0), generator=gen, num_tokens=8
        )
        losses.append(float(terms["diffusion"]))
    return sum(losses) / len(losses)


def test_lora_finetune_lowers_loss_and_changes_only_adapters(data: Path, export: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pipelines.cli import main
    from sora_model.lora import read_adapter

    recipe = _recipe(tmp_path, export, lora={"rank": LORA_RANK, "alpha": LORA_ALPHA, "merge_export": True})
    run = tmp_path / "run"
    t0 = time.perf_counter()
    first = _train(recipe, data, run, stop_at_step=6)  # stops at the first stage's end, checkpointed
    assert first["export"] is None
    second = _train(recipe, data, run, resume=True)
    print(f"LoRA fine-tune, 24 steps in two attempts: {time.perf_counter() - t0:.1f}s")
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    workers = json.loads((run / "workers.json").read_text())
    assert workers["start"] == "resumed at step 6"

    # The export: a peft adapter folder whose base is init_from, its EMA, and the merged whole export.
    out = Path(second["export"])
    config, pairs = read_adapter(out)
    assert config["base_model_name_or_path"] == str(export.resolve()) and config["r"] == LORA_RANK
    # B starts at 0: every adapter learned
    assert len(pairs) == 2 * 7 and all(b.abs().max() > 0 for _, b in pairs.values())
    _, ema_pairs = read_adapter(out / "ema")
    assert any(not torch.equal(ema_pairs[n][1], pairs[n][1]) for n in pairs)
    base, merged = load_file(str(export / "model.safetensors")), load_file(str(out / "merged" / "model.safetensors"))
    adapted = {f"{n}.weight" for n in pairs}
    assert all(torch.equal(merged[k], v) for k, v in base.items() if k not in adapted)  # the frozen base, bit for bit
    scale = LORA_ALPHA / LORA_RANK
    worst = max(
        (merged[f"{n}.weight"] - base[f"{n}.weight"] - scale * b @ a).abs().max().item() for n, (a, b) in pairs.items()
    )
    assert worst <= 1e-5, worst

    # The loss on a fixed batch falls (base vs base + adapter, the same noise and timesteps).
    before, after = fixed_batch_loss(str(export), data), fixed_batch_loss(str(export), data, lora=str(out))
    print(f"fixed-batch diffusion loss: base {before:.4f} -> LoRA {after:.4f} ({after / before:.3f}x)")
    assert after < 0.9 * before, (before, after)
    assert abs(fixed_batch_loss(str(out / "merged"), data) - after) < 1e-4

    # `sora export --merge-lora` of the last checkpoint equals the run's merged export.
    ckpt = sorted((run / "ray_results" / "wan-tiny-ft").glob("checkpoint_0*"))[-1]
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "offline"), "--merge-lora", "--ema"]) == 0
    offline = load_file(str(tmp_path / "offline" / "model.safetensors"))
    assert max((offline[k] - merged[k]).abs().max().item() for k in merged) <= 1e-6
    assert (tmp_path / "offline" / "ema.safetensors").is_file()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter")]) == 0
    assert read_adapter(tmp_path / "adapter")[1].keys() == pairs.keys()


def test_full_finetune_starts_from_init_from(data: Path, export: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    recipe = _recipe(tmp_path, export)
    spec = yaml.safe_load(Path(recipe).read_text())
    spec["stages"] = [{**spec["stages"][1], "steps": 4, "checkpoint_every": 0}]
    Path(recipe).write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    summary = _train(recipe, data, tmp_path / "run")
    print(f"full fine-tune, 4 steps: {time.perf_counter() - t0:.1f}s")
    base = load_file(str(export / "model.safetensors"))
    digest = json.loads((tmp_path / "run" / "workers.json").read_text())["weights_digest"]
    # ZeRO-3 started from the export
    assert max(abs(digest[k] - float(v.double().sum())) for k, v in base.items()) < 1e-3
    trained = load_file(str(Path(summary["export"]) / "model.safetensors"))
    assert trained.keys() == base.keys()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
